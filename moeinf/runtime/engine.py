"""LLM: the public entry point. Opens a checkpoint, loads it, and generates for batches of prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch

from moeinf.errors import RequestError, TokenizerError
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.tokenizer import TextCodec
from moeinf.runtime.executor import Executor, Span
from moeinf.runtime.sampling import SamplingParams, sample_next

Prompt = Union[str, Sequence[int]]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str | None  # None when the checkpoint has no tokenizer
    finish_reason: str  # "eos" or "length"


@dataclass
class _Running:
    prompt: list[int]
    span: Span
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device 'cuda' was requested, but torch sees no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise RequestError(f"expected device 'cpu' or 'cuda', found {str(device)!r}")
    return device


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """'auto' computes in float32 on the CPU and in the checkpoint's own dtype on CUDA."""
    if dtype == "auto":
        dtype = checkpoint_dtype if device.type == "cuda" and checkpoint_dtype in DTYPES else "float32"
    if dtype not in DTYPES:
        raise RequestError(f"expected dtype one of auto, {', '.join(DTYPES)}; found {dtype!r}")
    return DTYPES[dtype]


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "auto", progress: bool = True):
        self.checkpoint = Checkpoint.open(model)
        self.spec = self.checkpoint.spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.spec.torch_dtype, self.device)
        tokenizer_file = self.checkpoint.tokenizer_file
        self.codec = TextCodec(tokenizer_file) if tokenizer_file else None
        self.executor = Executor(self.checkpoint, self.device, self.dtype, progress)
        self._stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    def encode(self, text: str) -> list[int]:
        if self.codec is None:
            raise TokenizerError(f"{self.checkpoint.path} has no tokenizer.json; pass prompts as token id lists")
        return self.codec.encode(text)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RequestError("expected a prompt of at least one token, found an empty one")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids must lie in [0, {self.spec.vocab_size}), found {bad[:5]}")
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generates for every prompt (text, or a list of token ids) in one batch."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        running = []
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            capacity = len(ids) + params.max_new_tokens
            if capacity > self.spec.max_position:
                raise RequestError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                    f"model's {self.spec.max_position} positions"
                )
            running.append(_Running(ids, Span(self.executor.new_cache(capacity), len(ids))))

        start = time.perf_counter()
        tokens = torch.tensor([t for r in running for t in r.prompt], device=self.device)
        last_rows = torch.tensor([len(r.prompt) for r in running]).cumsum(0).sub(1).to(self.device)
        logits = self.executor.forward(tokens, [r.span for r in running], last_rows).cpu()
        self._accept(running, sample_next(logits, params, generator), params)
        self._stats["prefill_tokens"] += int(tokens.numel())
        self._stats["prefill_s"] += time.perf_counter() - start

        start = time.perf_counter()
        decoded = 0
        active = [r for r in running if r.finish_reason is None]
        while active:
            for r in active:
                r.span.count = 1
            tokens = torch.tensor([r.generated[-1] for r in active], device=self.device)
            logits = self.executor.forward(tokens, [r.span for r in active]).cpu()
            self._accept(active, sample_next(logits, params, generator), params)
            decoded += len(active)
            active = [r for r in active if r.finish_reason is None]
        self._stats["decode_tokens"] += decoded
        self._stats["decode_s"] += time.perf_counter() - start

        return [
            RequestOutput(
                prompt_token_ids=r.prompt,
                token_ids=r.generated,
                text=self.codec.decode(r.generated) if self.codec else None,
                finish_reason=r.finish_reason,
            )
            for r in running
        ]

    def _accept(self, running: list[_Running], next_tokens: list[int], params: SamplingParams) -> None:
        for r, token in zip(running, next_tokens):
            r.generated.append(token)
            if token in self.spec.eos_token_ids and not params.ignore_eos:
                r.finish_reason = "eos"
            elif len(r.generated) >= params.max_new_tokens:
                r.finish_reason = "length"

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-sequence forward from an empty cache: [T, vocab] float32 on the CPU."""
        ids = self._prompt_ids(token_ids)
        span = Span(self.executor.new_cache(len(ids)), len(ids))
        return self.executor.forward(torch.tensor(ids, device=self.device), [span]).cpu()

    def stats(self) -> dict[str, float]:
        """Counters since this LLM was built: tokens and seconds spent in prefill and decode."""
        return dict(self._stats)
