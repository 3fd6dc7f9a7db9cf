"""sidecall's Piper worker: one long-lived process per synthesis slot, so the voice loads once.

sidecall runs it (embedded in the binary) as `python -c <this> --model VOICE.onnx`, with the
`piper-tts` package from PyPI installed in that Python. Requests come on stdin, one JSON object
per line: {"text": "...", "length_scale": 1.0}. Answers go to stdout as frames: one kind byte,
a 4-byte little-endian length, the payload:
  R  ready, once at start: JSON {"sample_rate": N}
  A  audio: mono s16le at that rate, one clause at a time, as soon as it is made
  E  end of the request
  X  the request failed: a UTF-8 message (the request is over)
Clauses: a long sentence is spoken clause by clause (split after , ; : where both sides have
at least four words), so its first words are ready before the whole sentence is.
"""

import argparse
import json
import os
import re
import struct
import sys


def frame(out, kind, payload):
    out.write(kind + struct.pack("<I", len(payload)) + payload)
    out.flush()


def clauses(text):
    parts = [p for p in re.split(r"(?<=[,;:])\s+", text.strip()) if p]
    merged = []
    for p in parts:
        if merged and (len(merged[-1].split()) < 4 or len(p.split()) < 4):
            merged[-1] = merged[-1] + " " + p
        else:
            merged.append(p)
    return merged


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    # Frames go to the real stdout, alone: anything else that prints (piper, onnxruntime,
    # espeak-ng) goes to stderr and cannot break the framing.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        from piper import PiperVoice, SynthesisConfig

        voice = PiperVoice.load(args.model)
    except Exception as e:  # noqa: BLE001 - reported to sidecall, which logs it
        frame(out, b"X", f"cannot load the Piper voice {args.model}: {e}".encode())
        return 1
    frame(out, b"R", json.dumps({"sample_rate": voice.config.sample_rate}).encode())
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            config = SynthesisConfig(length_scale=float(req.get("length_scale") or 1.0))
            for clause in clauses(str(req.get("text", ""))):
                for chunk in voice.synthesize(clause, config):
                    frame(out, b"A", chunk.audio_int16_bytes)
            frame(out, b"E", b"")
        except Exception as e:  # noqa: BLE001 - one bad request does not end the worker
            frame(out, b"X", str(e).encode()[:500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
