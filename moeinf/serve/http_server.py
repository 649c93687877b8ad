"""The HTTP side of `moeinf serve`: routes, status codes and server-sent events over http.server.

    POST /v1/completions   OpenAI's completions (serve/protocol.py); with "stream": true, 200
                           text/event-stream: one event per generated token, then data: [DONE]
                           (or data: {"error": ...}, then [DONE], if generation fails)
    GET  /v1/models        {"object": "list", "data": [{"id": <model>, "object": "model", ...}]}
    GET  /health           {"status": "ok"}
    GET  /stats            LLM.stats(): tokens, seconds and expert traffic since the server started

Requests are parsed and checked on their own threads, then batched (serve/batching.py). Errors come
back as {"error": {"type": <exception name>, "message": ...}}: 400 for a bad request (checked
before it joins a batch, so one bad request fails no other), 404 for an unknown path, 411 without a
Content-Length, 413 for a body over MAX_BODY_BYTES, 503 once the server is stopping, 500 if
generation itself fails (every request of that batch).
"""

from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moeinf.errors import MoeinfError
from moeinf.runtime.engine import LLM
from moeinf.runtime.sampling import SamplingParams
from moeinf.serve.batching import Batcher, Completion, ServerClosing
from moeinf.serve.protocol import StreamedText, completion_response, parse_completion

MAX_BODY_BYTES = 1 << 20


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server and its batcher. start() starts the generation thread (requests submitted
    before it wait, and batch together); serve_forever() answers HTTP; server_close() stops both."""

    daemon_threads = True

    def __init__(
        self,
        llm: LLM,
        address: tuple[str, int],
        model_name: str,
        max_batch_prompts: int | None = None,
        log_requests: bool = True,
    ):
        self.batcher = Batcher(llm, max_batch_prompts)  # checks max_batch_prompts before the port is bound
        super().__init__(address, CompletionHandler)
        self.llm, self.model_name = llm, model_name
        self.log_requests = log_requests  # a line per request on stderr, as http.server writes it
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def max_batch_prompts(self) -> int:
        return self.batcher.max_batch_prompts

    @property
    def batch_sizes(self) -> list[int]:
        """Prompts per generate call, in order: what batching did."""
        return self.batcher.batch_sizes

    def start(self) -> None:
        self.batcher.start()

    def submit(self, prompts: list, params: SamplingParams, stream: bool = False) -> Completion:
        """Batcher.submit: checks the prompts, queues the request."""
        return self.batcher.submit(prompts, params, stream)

    def server_close(self) -> None:
        self.batcher.close()  # requests already queued are answered first
        super().server_close()


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries its Content-Length

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/v1/models":
            model = {
                "id": self.server.model_name,
                "object": "model",
                "created": self.server.created,
                "owned_by": "moeinf",
            }
            self._reply(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif self.path == "/stats":
            self._reply(HTTPStatus.OK, self.server.llm.stats())
        else:
            self._error(
                HTTPStatus.NOT_FOUND, "NotFound", f"expected GET /health, /v1/models or /stats, found {self.path}"
            )

    def do_POST(self) -> None:
        if self.path != "/v1/completions":
            self._error(HTTPStatus.NOT_FOUND, "NotFound", f"expected POST /v1/completions, found {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:  # without a length the body's end is unknown: reading on would wait for ever
            found = self.headers.get("Content-Length")
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "RequestError", f"expected a Content-Length >= 0, found {found!r}")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "RequestError",
                f"expected at most {MAX_BODY_BYTES} bytes, found {length}",
            )
            return
        body = self.rfile.read(length)
        try:
            prompts, params, stream = parse_completion(body)
            work = self.server.submit(prompts, params, stream)
        except MoeinfError as error:
            self._error(HTTPStatus.BAD_REQUEST, type(error).__name__, str(error))
            return
        except ServerClosing as error:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, type(error).__name__, str(error))
            return
        if work.events is not None:
            self._stream(work)
            return
        try:
            outputs = work.done.result()
        except Exception as error:  # noqa: BLE001 - generation failed: the client gets the reason
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, type(error).__name__, str(error))
            return
        self._reply(HTTPStatus.OK, completion_response(outputs, self.server.model_name))

    def _stream(self, work: Completion) -> None:
        """Server-sent events, one per token as the generation thread hands it over."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True
        server = self.server
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        texts = [StreamedText(server.llm.codec) for _ in work.prompt_ids]  # [prompts]
        while (event := work.events.get()) is not None:
            i, token, reason = event
            text = texts[i].add(token, last=reason is not None)
            choice = {"index": i, "text": text, "token_ids": [token], "finish_reason": reason}
            self._event({**head, "model": server.model_name, "choices": [choice]})
        error = work.done.exception()
        if error is not None:
            self._event({"error": {"type": type(error).__name__, "message": str(error)}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _error(self, status: HTTPStatus, kind: str, message: str) -> None:
        self._reply(status, {"error": {"type": kind, "message": message}})

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        if self.server.log_requests:
            super().log_message(format, *args)
