"""A stand-in inference runtime (standard library only): OpenAI-shaped answers to `/v1/models`,
`/v1/chat/completions`, `/v1/completions` and `/v1/embeddings`, that a test can tell to fail with a status, hang
before answering, or, while streaming, break the connection off, hold back the rest, or stream until the reader
goes away.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The reply every stand-in streams (in three pieces) and answers whole.
REPLY_PIECES = ["Hel", "lo from ", "the stand-in"]
REPLY = "".join(REPLY_PIECES)
# The vector every stand-in answers to embeddings: exact in float32, so a decoded one compares equal.
EMBEDDING = [0.5, -1.0, 2.0, 0.25]

# How long a held or hanging answer waits for `release()` at most, so that a failed test leaves no thread behind.
HOLD_LIMIT_S = 60


class Received:
    """One request as it arrived: path, headers (lower-case names) and the body's bytes."""

    def __init__(self, path: str, headers: dict[str, str], body: bytes):
        self.path = path
        self.headers = headers
        self.body = body


class StandIn:
    """A stand-in runtime on 127.0.0.1, on a port of its own, until `stop()`."""

    def __init__(self, name: str, models: list[str]):
        self.name = name
        self.models = models
        # What an inference request gets: "ok", "status" (answer `fail_status`), "hang" (no answer until released,
        # then the connection is closed; `reader_gone` is set if the router closes it first).
        self.mode = "ok"
        self.fail_status = 502
        # How a stream goes: "whole" (every piece, then [DONE]), "reset" (one piece, then a TCP reset), "hold" (one
        # piece, then the rest once released), "endless" (a piece every 20 ms until the reader has gone).
        self.stream = "whole"
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.first_piece_sent = threading.Event()
        self.released = threading.Event()
        self.reader_gone = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"stand-in {name}", daemon=True)
        self.thread.start()

    def inference_requests(self) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path != "/v1/models"]

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def _handler(runtime: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            self._record(b"")
            if self.path == "/v1/models":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "stand-in"} for m in runtime.models]
                self._json(200, {"object": "list", "data": data})
            else:
                self._json(404, {"error": {"message": "no such path", "type": "not_found"}})

        def do_POST(self) -> None:  # noqa: N802 - the base class's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._record(body)
            if runtime.mode == "hang":
                self._hang()
                return
            if runtime.mode == "status":
                error = {"message": f"{runtime.name} fails on purpose", "type": "server_error", "code": "stand_in"}
                self._json(runtime.fail_status, {"error": error})
                return
            request = json.loads(body)
            model = request.get("model")
            if self.path == "/v1/embeddings":
                self._json(200, _embeddings(model, request.get("encoding_format")))
            elif request.get("stream"):
                options = request.get("stream_options") or {}
                self._stream(model, bool(options.get("include_usage")))
            elif self.path == "/v1/chat/completions":
                message = {"role": "assistant", "content": REPLY}
                choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
                self._json(200, _answer("chat.completion", model, choice))
            elif self.path == "/v1/completions":
                choice = {"index": 0, "text": REPLY, "finish_reason": "stop", "logprobs": None}
                self._json(200, _answer("text_completion", model, choice))
            else:
                self._json(404, {"error": {"message": "no such path", "type": "not_found"}})

        def _hang(self) -> None:
            """Answer nothing until released, noting when the other end closes the connection meanwhile."""
            self.close_connection = True
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not runtime.released.wait(0.02) and time.monotonic() < deadline:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable:
                    try:
                        gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                    except ConnectionError:
                        gone = True
                    if gone:
                        runtime.reader_gone.set()
                        return

        def _record(self, body: bytes) -> None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            with runtime.lock:
                runtime.received.append(Received(self.path, headers, body))

        def _json(self, status: int, value: Any) -> None:
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, model: str, include_usage: bool = False) -> None:
            """As OpenAI streams: asked for usage, every event carries `"usage": null` and one more, with no
            choices, carries the usage."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._chunk(_delta(model, {"role": "assistant", "content": REPLY_PIECES[0]}, usage=include_usage))
                self.wfile.flush()
                runtime.first_piece_sent.set()
                if runtime.stream == "reset":
                    # SO_LINGER 0: closing sends a TCP reset, as a runtime that crashes does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if runtime.stream == "hold":
                    runtime.released.wait(HOLD_LIMIT_S)
                if runtime.stream == "endless":
                    deadline = time.monotonic() + HOLD_LIMIT_S
                    while time.monotonic() < deadline:
                        self._chunk(_delta(model, {"content": "."}))
                        time.sleep(0.02)
                    return
                for piece in REPLY_PIECES[1:]:
                    self._chunk(_delta(model, {"content": piece}, usage=include_usage))
                self._chunk(_delta(model, {}, finish_reason="stop", usage=include_usage))
                if include_usage:
                    last = _delta(model, {}, usage=True)
                    last["choices"] = []
                    last["usage"] = USAGE
                    self._chunk(last)
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                runtime.reader_gone.set()
                self.close_connection = True

        def _chunk(self, data: dict[str, Any] | bytes) -> None:
            if isinstance(data, dict):
                data = b"data: " + json.dumps(data).encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


# What every answer used, as the runtime reports it.
USAGE = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
# A fixed creation time, so answers compare equal whenever they were made.
CREATED = 1_767_225_600


def _answer(kind: str, model: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"id": "cmpl-stand-in", "object": kind, "created": CREATED, "model": model,
            "choices": [choice], "usage": USAGE}


def _delta(model: str, delta: dict[str, Any], finish_reason: str | None = None,
           usage: bool = False) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    chunk = {"id": "chatcmpl-stand-in", "object": "chat.completion.chunk", "created": CREATED,
             "model": model, "choices": [choice]}
    if usage:
        chunk["usage"] = None
    return chunk


def _embeddings(model: str, encoding_format: str | None) -> dict[str, Any]:
    vector: Any = EMBEDDING
    if encoding_format == "base64":
        vector = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
    return {"object": "list", "model": model, "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}}
