"""SamplingParams and the choice of the next token from the last position's logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeinf.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None  # seeds the sampling generator of one generate call
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)

    def __post_init__(self) -> None:
        checks = (
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens >= 1"),
            (self.temperature >= 0, "temperature >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k an integer >= 0"),
            (0 < self.top_p <= 1, "0 < top_p <= 1"),
        )
        for ok, expected in checks:
            if not ok:
                raise RequestError(f"SamplingParams: expected {expected}, found {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> list[int]:
    """logits: [B, V] float32 on the CPU -> one token id per row."""
    if params.greedy:
        return logits.argmax(dim=-1).tolist()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p; the first always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
