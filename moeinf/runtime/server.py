"""`moeinf serve`: one LLM behind HTTP, with OpenAI-style completions.

    POST /v1/completions   {"prompt": "text" | [ids] | ["text", ...] | [[ids], ...],
                            "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                            "seed": null, "ignore_eos": false, "stream": false}
        200 {"id", "object": "text_completion", "created", "model",
             "choices": [{"index", "text", "token_ids", "finish_reason"}, ...],  one per prompt
             "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
        with "stream": true, 200 text/event-stream: one event per generated token,
             data: {"id", "object", "created", "model",
                    "choices": [{"index", "text": <new text>, "token_ids": [token], "finish_reason"}]}
             then data: [DONE] (or data: {"error": ...}, then [DONE], if generation fails)
    GET  /v1/models        {"object": "list", "data": [{"id": <model>, "object": "model", ...}]}
    GET  /health           {"status": "ok"}
    GET  /stats            LLM.stats(): tokens, seconds and expert traffic since the server started

Defaults follow OpenAI's completions API (max_tokens 16, temperature 1); "model", "n": 1 and
"stop": null are accepted as OpenAI clients send them, anything else that moeinf does not do
(n > 1, stop strings, logprobs, ...) is refused with a 400 that names the field. "text" is null
where the checkpoint has no tokenizer.json (prompts are then token ids). A streamed token whose
text ends inside a multi-byte character sends "" and the text follows with the next token, so the
streamed texts add up to the whole text.

Batching. HTTP requests are parsed and checked on their own threads; one generation thread owns
the LLM. It takes the oldest waiting request and every other waiting one with the same sampling
settings, up to max_batch_prompts prompts, and runs them as one generate call: one batch through
the experts, each layer's GEMMs over all of their tokens. A request with a seed runs alone, so that
its sampled tokens do not depend on what it was batched with. Greedy tokens do not depend on the
batch (tests/test_generate.py: batch equals one prompt at a time).

How many prompts to batch depends on the expert budget. Offloaded, a step of B prompts routes to
the union of their experts; once that outgrows the slots, the batch reloads more than its batched
GEMMs save. So by default (max_batch_prompts=None) the server batches only as many prompts as the
slots are expected to serve, fitting_batch, at most MAX_BATCH_PROMPTS (figures: bench/serve.py and
bench/results/serve-cpu.json).

Errors come back as {"error": {"type": <exception name>, "message": ...}}: 400 for a bad request
(checked before it joins a batch, so one bad request fails no other), 404 for an unknown path,
411 without a Content-Length, 413 for a body over MAX_BODY_BYTES, 503 once the server is stopping,
500 if generation itself fails (every request of that batch).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moeinf.errors import MoeinfError, RequestError
from moeinf.loaders.tokenizer import TextCodec
from moeinf.runtime.engine import LLM, RequestOutput
from moeinf.runtime.sampling import SamplingParams

MAX_BODY_BYTES = 1 << 20
MAX_BATCH_PROMPTS = 8  # prompts one generate call batches, at most, by default
# Decode steps of routing the slots should hold at once for a batch to pay: one step's experts and
# about half the next's, which its prompts route elsewhere. Fitted with bench/serve.py (default
# model, 25 / 50 / 75 / 100% budgets): at 1 a 2-prompt batch at 50% lost 13% to one prompt a call.
STEP_SPAN = 1.5
# OpenAI's completions fields moeinf runs -> (SamplingParams field, default)
SAMPLING_FIELDS = {
    "max_tokens": ("max_new_tokens", 16),
    "temperature": ("temperature", 1.0),
    "top_p": ("top_p", 1.0),
    "top_k": ("top_k", 0),
    "seed": ("seed", None),
    "ignore_eos": ("ignore_eos", False),
}
# fields OpenAI clients send by default, accepted only with the value that asks for nothing moeinf lacks
INERT_FIELDS = {"n": 1, "stop": None, "echo": False, "logprobs": None, "suffix": None}


class ServerClosing(RuntimeError):
    """A request came in after the server began to stop; answered with 503."""


@dataclass
class Completion:
    """One request's work, waiting for the generation thread."""

    prompt_ids: list[list[int]]  # [prompts][tokens], checked against the model
    params: SamplingParams
    done: Future  # -> list[RequestOutput], one per prompt
    # streaming: (prompt index, token, finish reason) per token as generated, then None once done
    events: queue.SimpleQueue | None = None


def fitting_batch(num_layers: int, num_experts: int, top_k: int, slots: int, cap: int = MAX_BATCH_PROMPTS) -> int:
    """The most prompts (1 .. cap) whose routing over STEP_SPAN decode steps is expected to need no
    more experts than `slots` hold: n routings a layer reach E * (1 - (1 - k / E)^(n / k)) distinct
    experts when routing is uniform and independent (real routing repeats itself more, so this errs
    on the small side); B prompts make B * STEP_SPAN tokens' worth."""
    best = 1
    for batch in range(2, cap + 1):
        if num_layers * num_experts * (1.0 - (1.0 - top_k / num_experts) ** (batch * STEP_SPAN)) > slots:
            break
        best = batch
    return best


def _expect_number(data: dict, field: str, kind: type, default):
    value = data.get(field, default)
    if value is None and default is None:
        return None
    # bool is an int to Python, never a number to a client
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise RequestError(f"{field}: expected {'a number' if kind is float else 'an integer'}, found {value!r}")
    return kind(value)


def _expect_flag(data: dict, field: str, default: bool) -> bool:
    value = data.get(field, default)
    if not isinstance(value, bool):
        raise RequestError(f"{field}: expected true or false, found {value!r}")
    return value


def parse_prompts(prompt) -> list:
    """ "prompt" of a completions request -> [text | [ids]]: one text, one id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p)) for p in prompt)
    ):
        return list(prompt)
    raise RequestError(
        "prompt: expected a string, a list of token ids, or a non-empty list of either, "
        f"found {json.dumps(prompt)[:80] if prompt is not None else 'none'}"
    )


def parse_completion(body: bytes) -> tuple[list, SamplingParams, bool]:
    """The JSON body of POST /v1/completions -> (prompts, SamplingParams, stream); RequestError
    names what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"request body: expected a JSON object, found invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise RequestError(f"request body: expected a JSON object, found {type(data).__name__}")
    unknown = sorted(set(data) - set(SAMPLING_FIELDS) - set(INERT_FIELDS) - {"prompt", "model", "stream"})
    if unknown:
        known = ", ".join(["prompt", "model", "stream", *SAMPLING_FIELDS, *INERT_FIELDS])
        raise RequestError(
            f"request: expected fields among {known}; found {', '.join(unknown)}, which moeinf does not do"
        )
    for field, inert in INERT_FIELDS.items():
        if field in data and data[field] != inert:
            raise RequestError(f"{field}: moeinf serves only {json.dumps(inert)}, found {json.dumps(data[field])}")
    settings = {}
    for field, (name, default) in SAMPLING_FIELDS.items():
        if isinstance(default, bool):
            settings[name] = _expect_flag(data, field, default)
        else:
            kind = float if isinstance(default, float) else int
            settings[name] = _expect_number(data, field, kind, default)
    stream = _expect_flag(data, "stream", False)
    return parse_prompts(data.get("prompt")), SamplingParams(**settings), stream


class StreamedText:
    """One streamed sequence's text, handed out a piece per token: the pieces add up to the text of
    all its tokens. A token that ends inside a multi-byte character decodes to U+FFFD; its piece
    is "" and the character comes with the token that completes it (or with the last token)."""

    def __init__(self, codec: TextCodec | None):
        self.codec = codec  # None: the checkpoint has no tokenizer, and every piece is None
        self.tokens: list[int] = []
        self.sent = ""  # the text handed out so far

    def add(self, token: int, last: bool) -> str | None:
        self.tokens.append(token)
        if self.codec is None:
            return None
        whole = self.codec.decode(self.tokens)
        if not last and whole.endswith("\ufffd"):
            return ""
        piece, self.sent = whole[len(self.sent) :], whole
        return piece


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server and its generation thread. start() starts the thread (requests submitted
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
        if max_batch_prompts is None:  # as many as the expert slots serve without thrashing
            spec = llm.spec
            slots = llm.experts.w13.shape[0]
            max_batch_prompts = fitting_batch(spec.num_moe_layers, spec.num_experts, spec.top_k, slots)
        if isinstance(max_batch_prompts, bool) or not isinstance(max_batch_prompts, int) or max_batch_prompts < 1:
            raise RequestError(f"max_batch_prompts: expected an integer >= 1, found {max_batch_prompts!r}")
        super().__init__(address, CompletionHandler)
        self.llm, self.model_name, self.max_batch_prompts = llm, model_name, max_batch_prompts
        self.log_requests = log_requests  # a line per request on stderr, as http.server writes it
        self.created = int(time.time())
        self.batch_sizes: list[int] = []  # prompts per generate call, in order: what batching did
        self._waiting: deque[Completion] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._generate_loop, name="moeinf-generate", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._worker.start()

    def submit(self, prompts: list, params: SamplingParams, stream: bool = False) -> Completion:
        """Checks each prompt against the model (RequestError here, before it joins a batch) and
        queues the request; its future gives one RequestOutput per prompt, and with stream its
        events queue gets each token as it is generated."""
        ids = [self.llm.prompt_ids(p, params.max_new_tokens) for p in prompts]
        work = Completion(ids, params, Future(), queue.SimpleQueue() if stream else None)
        with self._cv:
            if self._stopping:
                raise ServerClosing("expected a running server, found one shutting down")
            self._waiting.append(work)
            self._cv.notify()
        return work

    def _next_batch(self) -> list[Completion]:
        """Blocks for the oldest waiting request; takes along the waiting ones it can share a
        generate call with. Empty once the server stops."""
        with self._cv:
            while not self._waiting and not self._stopping:
                self._cv.wait()
            if not self._waiting:
                return []
            first = self._waiting.popleft()
            batch, size = [first], len(first.prompt_ids)
            if first.params.seed is None:
                for work in list(self._waiting):
                    fits = size + len(work.prompt_ids) <= self.max_batch_prompts
                    if work.params == first.params and fits:
                        self._waiting.remove(work)
                        batch.append(work)
                        size += len(work.prompt_ids)
            return batch

    def _generate_loop(self) -> None:
        while batch := self._next_batch():
            prompts = [ids for work in batch for ids in work.prompt_ids]
            owners = [(work, i) for work in batch for i in range(len(work.prompt_ids))]  # [prompts]
            self.batch_sizes.append(len(prompts))

            def on_token(place: int, token: int, reason: str | None) -> None:
                work, i = owners[place]
                if work.events is not None:
                    work.events.put((i, token, reason))

            try:
                outputs = self.llm.generate(prompts, batch[0].params, on_token=on_token)
            except BaseException as error:  # noqa: BLE001 - handed to every request of the batch
                for work in batch:
                    work.done.set_exception(error)
            else:
                for work in batch:
                    work.done.set_result(outputs[: len(work.prompt_ids)])
                    outputs = outputs[len(work.prompt_ids) :]
            for work in batch:
                if work.events is not None:
                    work.events.put(None)

    def server_close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._worker.is_alive():
            self._worker.join()
        super().server_close()

    def completion_response(self, outputs: list[RequestOutput]) -> dict:
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        completion_tokens = sum(len(o.token_ids) for o in outputs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"index": i, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                for i, o in enumerate(outputs)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


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
        self._reply(HTTPStatus.OK, self.server.completion_response(outputs))

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
