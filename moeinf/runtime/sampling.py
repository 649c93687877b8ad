"""SamplingParams and the choice of the next token from the last position's logits."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from moeinf.errors import RequestError

# the seeds torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer
SEED_MIN, SEED_END = -(2**63), 2**64


def is_integer(value: object) -> bool:
    """An int (numpy's too), but not a bool: True is not a token count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: object) -> bool:
    """An int or a float (numpy's too) that is neither a bool, nan nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None  # seeds the sampling generator of one generate call
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)

    def __post_init__(self) -> None:
        seed = self.seed
        checks = (
            ("max_new_tokens", is_integer(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", is_finite_number(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_k", is_integer(self.top_k) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", is_finite_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            (
                "seed",
                seed is None or (is_integer(seed) and SEED_MIN <= seed < SEED_END),
                "None or an integer in [-2**63, 2**64)",
            ),
            ("ignore_eos", isinstance(self.ignore_eos, (bool, np.bool_)), "True or False"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise RequestError(f"SamplingParams: expected {name} to be {expected}, found {getattr(self, name)!r}")
        # numpy's scalars as Python's (torch's manual_seed refuses a numpy uint64)
        for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "seed", None if seed is None else int(seed))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))

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
