"""The Expert Activation Matrix (EAM) of one sequence: how many of its tokens each expert of each
layer served, prefill and decode kept apart (MoE-Infinity's trace of a request); and the one count
of routed expert ids into tokens per expert that the EAM, the policies, traces and replay share."""

from __future__ import annotations

import numpy as np

PREFILL, DECODE = 0, 1


def expert_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens routed to each expert, int64: ids [T, K] (one layer) -> [E], or ids [T, L, K] (every
    layer) -> [L, E]."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 2:
        return np.bincount(ids.reshape(-1), minlength=num_experts)
    L = ids.shape[1]
    flat = (np.arange(L)[None, :, None] * num_experts + ids).reshape(-1)  # layer * E + expert
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


class SequenceEAM:
    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((2, num_layers, num_experts), dtype=np.int32)  # [phase, L, E]

    def add(self, phase: int, layer: int, expert_ids: np.ndarray) -> None:
        """expert_ids: [n, K] the experts this sequence's n new tokens routed to at `layer`."""
        self.counts[phase, layer] += expert_counts(expert_ids, self.counts.shape[2]).astype(np.int32)

    @property
    def prefill(self) -> np.ndarray:
        return self.counts[PREFILL]

    @property
    def decode(self) -> np.ndarray:
        return self.counts[DECODE]

    def total(self) -> np.ndarray:
        """[L, E] prefill and decode together."""
        return self.counts.sum(axis=0)
