"""sidecall's Piper worker: one long-lived process per synthesis slot, so the voice loads once.

sidecall runs it (embedded in the binary) as `python -c <this> --model VOICE.onnx`, with the
`piper-tts` package from PyPI installed in that Python. Requests come on stdin, one JSON object
per line: {"id": N, "text": "...", "length_scale": 1.0}; {"cancel": N} while request N is being
made stops it after the clause in hand (its end frame follows at once; a cancel for a request
already over is ignored). Answers go to stdout as frames: one kind byte,
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
import queue
import struct
import sys
import threading


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
    # Requests are read beside the synthesis, so a cancel reaches the request it stops.
    requests = queue.Queue()
    cancelled = set()
    lock = threading.Lock()

    def read_stdin():
        try:
            for raw in sys.stdin.buffer:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = line  # reported as that request's failure
                if isinstance(msg, dict) and "cancel" in msg:
                    if isinstance(msg["cancel"], int):
                        with lock:
                            cancelled.add(msg["cancel"])
                    continue
                requests.put(msg)
        finally:
            # However reading ends, the worker ends with it (sidecall starts another).
            requests.put(None)

    threading.Thread(target=read_stdin, daemon=True).start()
    while (req := requests.get()) is not None:
        rid = req.get("id") if isinstance(req, dict) else None

        def stopped():
            with lock:
                return isinstance(rid, int) and rid in cancelled

        try:
            if not isinstance(req, dict):
                raise ValueError(f"not a request: {str(req)[:100]}")
            config = SynthesisConfig(length_scale=float(req.get("length_scale") or 1.0))
            for clause in clauses(str(req.get("text", ""))):
                if stopped():
                    break
                for chunk in voice.synthesize(clause, config):
                    frame(out, b"A", chunk.audio_int16_bytes)
                    if stopped():
                        break
            frame(out, b"E", b"")
        except Exception as e:  # noqa: BLE001 - one bad request does not end the worker
            frame(out, b"X", str(e).encode()[:500])
        with lock:
            # Cancels of this request or older ones came too late to matter.
            if isinstance(rid, int):
                cancelled.difference_update({c for c in cancelled if c <= rid})
    return 0


if __name__ == "__main__":
    sys.exit(main())
