"""OpenAI's completions protocol as moeinf serves it: request bodies -> prompts and SamplingParams,
outputs -> response bodies, and streamed text a token at a time.

    request   {"prompt": "text" | [ids] | ["text", ...] | [[ids], ...],
               "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
               "seed": null, "ignore_eos": false, "stream": false}
    response  {"id", "object": "text_completion", "created", "model",
               "choices": [{"index", "text", "token_ids", "finish_reason"}, ...],  one per prompt
               "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    streamed  one event per generated token: {"id", "object", "created", "model",
               "choices": [{"index", "text": <new text>, "token_ids": [token], "finish_reason"}]}

Defaults follow OpenAI's completions API (max_tokens 16, temperature 1); "model", "n": 1 and
"stop": null are accepted as OpenAI clients send them, anything else that moeinf does not do
(n > 1, stop strings, logprobs, ...) is refused with a RequestError that names the field. "text" is
null where the checkpoint has no tokenizer.json (prompts are then token ids). A streamed token
whose text ends inside a multi-byte character sends "" and the text follows with the next token,
so the streamed texts add up to the whole text.
"""

from __future__ import annotations

import json
import time
import uuid

from moeinf.errors import RequestError
from moeinf.loaders.tokenizer import TextCodec
from moeinf.runtime.engine import RequestOutput
from moeinf.runtime.sampling import SamplingParams

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


def completion_response(outputs: list[RequestOutput], model_name: str) -> dict:
    """The response body of a completions request whose prompts gave `outputs` (one per prompt)."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
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
