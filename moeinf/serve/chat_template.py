"""A checkpoint's chat template (tokenizer_config.json "chat_template"), rendered as transformers'
apply_chat_template renders it: jinja2's immutable sandbox (templates come from the Hub and are
untrusted), trim_blocks and lstrip_blocks, the loop-control extension, raise_exception(), a tojson
that does not escape HTML, strftime_now(), and the special tokens of tokenizer_config.json
(bos_token, eos_token, ...) as variables.

    messages  [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...]
    -> text   the conversation with the assistant's turn opened (add_generation_prompt)

The rendered text is encoded without the tokenizer's own special tokens: a template writes its BOS
itself, as transformers does (tokenize=True encodes with add_special_tokens=False).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moeinf.errors import ConfigError, RequestError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(RequestError):
    """The template refused the conversation (its raise_exception), or failed while rendering it."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self.template = environment.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise ConfigError(f"chat_template: expected a jinja2 template, found a syntax error ({error})") from None
        self.special_tokens = special_tokens or {}

    @classmethod
    def from_checkpoint(cls, folder: Path) -> ChatTemplate | None:
        """The template of the checkpoint in `folder`, or None when it has none."""
        path = Path(folder) / "tokenizer_config.json"
        if not path.exists():
            return None
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: expected a JSON object, found invalid JSON ({error})") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: the "default" one
            source = next(
                (t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None
            )
        if source is None:
            return None
        if not isinstance(source, str):
            raise ConfigError(f"{path}: chat_template: expected a string, found {type(source).__name__}")
        tokens = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        return cls(source, tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(f"messages: the chat template refused them ({error})") from None
