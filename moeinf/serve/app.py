"""The HTTP routes of `moeinf serve`, a FastAPI app over one LLM's engine loop.

    POST /v1/completions        OpenAI's completions (serve/protocol.py); "stream": true answers
                                server-sent events, a chunk per token, then data: [DONE]
    POST /v1/chat/completions   the same for chat, through the checkpoint's chat template
                                (serve/chat_template.py); 400 when the checkpoint has none
    GET  /v1/models             the served model under each of its names
    GET  /health                {"status": "ok"}
    GET  /stats                 LLM.stats(): tokens, seconds and expert traffic since it started

Each prompt is one request of the engine loop (runtime/engine_loop.py), which batches every
running request a decode step at a time; the routes only translate. A client that disconnects
cancels its requests at the next step. Errors have OpenAI's shape, {"error": {"message", "type",
"param", "code"}}: 400 for a bad request (checked before it reaches the engine), 404 for an unknown
path or model, 413 for a body over MAX_BODY_BYTES, 503 once the server is stopping, 500 if generation itself fails.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from moeinf.errors import LLMClosedError, MoeinfError
from moeinf.runtime.engine import LLM
from moeinf.runtime.engine_loop import EngineLoop, RequestHandle
from moeinf.runtime.sampling import SamplingParams
from moeinf.serve.chat_template import ChatTemplate
from moeinf.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FieldError,
    ResponseHead,
    chat_chunk,
    chat_response,
    completion_choice,
    completion_response,
    error_body,
    parse_request,
    usage,
)
from moeinf.serve.streamed_text import StreamedText

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class APIError(Exception):
    """An error answer: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.kind, self.param, self.code), status_code=self.status)


def build_app(llm: LLM, engine: EngineLoop, names: list[str]) -> FastAPI:
    """names: what requests may call the model ("model"); the first is the one answers carry."""
    app = FastAPI(title="moeinf", docs_url=None, redoc_url=None, openapi_url=None)
    template = ChatTemplate.from_checkpoint(llm.checkpoint.path)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(error_body(message, kind), status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "moeinf"} for name in names]
        return {"object": "list", "data": data}

    @app.get("/stats")
    async def stats() -> dict:
        return llm.stats()

    def check_model(model: str) -> None:
        if model not in names:
            served = ", ".join(names)
            raise APIError(
                404, f"model: expected {served}, found {model!r}", "invalid_request_error", "model", "model_not_found"
            )

    def submit(prompts: list, params: SamplingParams, param: str, listener_for=None) -> list[RequestHandle]:
        """One engine request per prompt; all or none (a bad prompt cancels the ones before it)."""
        handles: list[RequestHandle] = []
        try:
            for i, prompt in enumerate(prompts):
                handles.append(engine.submit(prompt, params, None if listener_for is None else listener_for(i)))
        except MoeinfError as error:
            for handle in handles:
                handle.cancel()
            if isinstance(error, LLMClosedError):  # the server is stopping (EngineClosing)
                raise APIError(503, str(error), "server_error") from None
            raise APIError(400, str(error), "invalid_request_error", param) from None
        return handles

    async def body_of(request: Request, model: type):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:  # refused unread
            raise APIError(
                413, f"request body: expected at most {MAX_BODY_BYTES} bytes, found {length}", "invalid_request_error"
            )
        try:
            parsed = parse_request(model, await request.body())
        except FieldError as error:
            raise APIError(400, str(error), "invalid_request_error", error.param) from None
        check_model(parsed.model)
        return parsed

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await body_of(request, CompletionRequest)
        params = sampling(body, body.max_tokens or 16)
        head = ResponseHead("text_completion", names[0])
        prompts = body.prompts()
        if not body.stream:
            handles = submit(prompts, params, "prompt")
            outputs = await finished(request, handles)
            return JSONResponse(completion_response(head, outputs))
        events, listener_for = event_queue()
        handles = submit(prompts, params, "prompt", listener_for)

        async def chunks() -> AsyncIterator[str]:
            texts = [StreamedText(llm.codec) for _ in prompts]  # [prompts]
            async for i, token, reason in tokens(events, handles):
                text = texts[i].add(token, last=reason is not None)
                yield sse(head.body([completion_choice(i, text, [token], reason)]))
            if body.include_usage:
                yield sse(head.body([], usage=usage([h.result() for h in handles])))

        return streaming(chunks(), handles)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await body_of(request, ChatCompletionRequest)
        if template is None or llm.codec is None:
            missing = "a chat_template in tokenizer_config.json" if template is None else "a tokenizer.json"
            message = f"messages: this model has no chat template ({missing}); use /v1/completions with a prompt"
            raise APIError(400, message, "invalid_request_error", "messages")
        try:
            ids = llm.codec.encode(template.render(body.conversation()), add_special_tokens=False)
        except MoeinfError as error:
            raise APIError(400, str(error), "invalid_request_error", "messages") from None
        room = llm.spec.max_position - len(ids)
        max_new = body.max_new_tokens if body.max_new_tokens is not None else max(room, 1)
        params = sampling(body, max_new)
        head = ResponseHead("chat.completion", names[0])
        if not body.stream:
            (output,) = await finished(request, submit([ids], params, "messages"))
            return JSONResponse(chat_response(head, output))
        events, listener_for = event_queue()
        handles = submit([ids], params, "messages", listener_for)

        async def chunks() -> AsyncIterator[str]:
            text = StreamedText(llm.codec)
            yield sse(chat_chunk(head, {"role": "assistant", "content": ""}))
            async for _i, token, reason in tokens(events, handles):
                piece = text.add(token, last=reason is not None)
                yield sse(chat_chunk(head, {"content": piece} if piece else {}, reason))
            if body.include_usage:
                yield sse(head.body([], "chat.completion.chunk", usage=usage([handles[0].result()])))

        return streaming(chunks(), handles)

    return app


def sampling(body, max_new_tokens: int) -> SamplingParams:
    try:
        return body.sampling(max_new_tokens)
    except MoeinfError as error:
        raise APIError(400, str(error), "invalid_request_error") from None


def event_queue():
    """An asyncio queue of (prompt index, event) and a listener factory that feeds it from the
    engine's thread. A listener never raises into the engine: once the loop is gone, it drops."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def listener_for(i: int):
        def listen(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (i, event))
            except RuntimeError:  # the event loop closed: nobody is listening any more
                pass

        return listen

    return events, listener_for


async def tokens(events: asyncio.Queue, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, int, str | None]]:
    """(prompt index, token, finish reason) as the engine generates them, until every request
    left; raises what failed one."""
    left = len(handles)
    while left:
        i, event = await events.get()
        if event is None:
            left -= 1
            continue
        yield (i, *event)
    for handle in handles:
        error = handle.done.exception()
        if error is not None:
            raise error


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def streaming(chunks: AsyncIterator[str], handles: list[RequestHandle]) -> StreamingResponse:
    """Server-sent events; a generation failure ends the stream with an error event. Whatever ends
    it (the last token, a disconnect), its requests are cancelled: a no-op for finished ones."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as error:  # noqa: BLE001 - the stream has begun: the error goes in it
            yield sse(error_body(str(error), "server_error"))
        finally:
            for handle in handles:
                handle.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def finished(request: Request, handles: list[RequestHandle]) -> list:
    """The requests' outputs once all finished; a client that left cancels them."""
    waiting = asyncio.gather(*(asyncio.wrap_future(h.done) for h in handles))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                raise APIError(499, "the client closed the request", "invalid_request_error")
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    try:
        return waiting.result()
    except MoeinfError as error:
        raise APIError(400, str(error), "invalid_request_error") from None
    except Exception as error:  # noqa: BLE001 - generation failed: the client gets the reason
        raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error") from None
