"""OpenAI's completions and chat completions protocol as moeinf serves it: pydantic models of the
request bodies, and the response bodies, whole and streamed.

    completions  {"model", "prompt": "text" | [ids] | ["text", ...] | [[ids], ...], "max_tokens": 16,
                  "temperature": 1, "top_p": 1, "seed": null, "stream": false, "stream_options",
                  + vLLM's "top_k" (0 or -1: none) and "ignore_eos"}
                 -> {"id", "object": "text_completion", "created", "model",
                     "choices": [{"index", "text", "token_ids", "logprobs": null, "finish_reason"}],
                     "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    chat         {"model", "messages": [{"role", "content": str | [{"type": "text", "text"}]}],
                  "max_tokens" | "max_completion_tokens" (default: as many as the positions
                  allow), and the sampling fields above}
                 -> {"id", "object": "chat.completion", ..., "choices": [{"index": 0,
                     "message": {"role": "assistant", "content"}, "finish_reason"}], "usage"}

Defaults are OpenAI's. Fields OpenAI clients may send that moeinf does not do (n > 1, stop,
logprobs, penalties, tools, ...) are accepted only with the value that asks for nothing, else
refused naming the field. finish_reason is OpenAI's: "stop" (end of sequence), "length".
Values are checked strictly: a bool is not an integer and a string is not a number.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeinf.errors import RequestError
from moeinf.runtime.sampling import SamplingParams
from moeinf.runtime.scheduler import RequestOutput

Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]  # what torch.Generator.manual_seed takes
FINISH_REASONS = {"eos": "stop", "length": "length", "cancelled": "abort"}
RENAMED = {"max_new_tokens": "max_tokens"}  # moeinf's own names a client may send by mistake
NESTED_FIELDS = {"role", "content", "type", "text", "name", "include_usage"}
PROMPT_FIELDS = {
    "prompt": "a string, a list of token ids, or a non-empty list of either",
    "messages": 'a non-empty list of {"role": "system" | "user" | "assistant", "content": <text>}',
}


class FieldError(RequestError):
    """A request field is missing or wrong; `param` names it as OpenAI's API does."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    # accepted only as the value that asks for nothing moeinf lacks
    n: Literal[1] = 1
    stop: Union[None, Annotated[list[str], Field(max_length=0)]] = None
    logprobs: Literal[None, False] = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: Union[None, Annotated[dict[str, float], Field(max_length=0)]] = None

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: Union[str, TokenIds, Annotated[list[Union[str, TokenIds]], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[None, 1] = None

    def prompts(self) -> list:
        """[text | [ids]]: one per choice."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Union[None, Annotated[list, Field(max_length=0)]] = None
    tool_choice: Literal[None, "none"] = None
    response_format: Union[None, dict] = None

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(model: type[BaseModel], body: bytes):
    """The JSON body -> `model`; FieldError names the first field that is wrong."""
    try:
        request = model.model_validate_json(body or b"")
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid" or not first["loc"]:
            raise FieldError(f"request body: expected a JSON object, found {first['msg']}", None) from None
        # the OpenAI field, and where inside it (list indexes, nested fields; not pydantic's union members)
        param = str(first["loc"][0])
        where = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p in NESTED_FIELDS)
        if first["type"] == "extra_forbidden":
            hint = f" (OpenAI's name: {RENAMED[param]})" if param in RENAMED else ""
            raise FieldError(f"{param}: not a field moeinf takes{hint}", param) from None
        if param in PROMPT_FIELDS:
            raise FieldError(f"{param}: expected {PROMPT_FIELDS[param]}, found {repr(first.get('input'))[:80]}", param)
        shown = "nothing" if first["type"] == "missing" else repr(first.get("input"))[:80]
        raise FieldError(f"{param}{'.' + where if where else ''}: {first['msg']}, found {shown}", param) from None
    if isinstance(request, ChatCompletionRequest) and request.response_format not in (None, {"type": "text"}):
        raise FieldError("response_format: moeinf serves only {'type': 'text'}", "response_format")
    return request


def usage(outputs: list[RequestOutput]) -> dict:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, reason)


class ResponseHead:
    """The fields every body and chunk of one response shares."""

    def __init__(self, kind: Literal["text_completion", "chat.completion"], model_name: str):
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        self.kind, self.id, self.created, self.model = (
            kind,
            f"{prefix}-{uuid.uuid4().hex}",
            int(time.time()),
            model_name,
        )

    def body(self, choices: list[dict], object_name: str | None = None, **extra) -> dict:
        return {
            "id": self.id,
            "object": object_name or self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def completion_choice(index: int, text: str | None, token_ids: list[int], reason: str | None) -> dict:
    return {
        "index": index,
        "text": text,
        "token_ids": token_ids,
        "logprobs": None,
        "finish_reason": finish_reason(reason),
    }


def completion_response(head: ResponseHead, outputs: list[RequestOutput]) -> dict:
    choices = [completion_choice(i, o.text, o.token_ids, o.finish_reason) for i, o in enumerate(outputs)]
    return head.body(choices, usage=usage(outputs))


def chat_response(head: ResponseHead, output: RequestOutput) -> dict:
    message = {"role": "assistant", "content": output.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(output.finish_reason)}
    return head.body([choice], usage=usage([output]))


def chat_chunk(head: ResponseHead, delta: dict, reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason)}
    return head.body([choice], "chat.completion.chunk")


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
