"""The Expert Activation Matrix (EAM) of one sequence: how many of its tokens each expert of each
layer served, prefill and decode kept apart (MoE-Infinity's trace of a request)."""

from __future__ import annotations

import numpy as np

PREFILL, DECODE = 0, 1


class SequenceEAM:
    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((2, num_layers, num_experts), dtype=np.int32)  # [phase, L, E]

    def add(self, phase: int, layer: int, expert_ids: np.ndarray) -> None:
        """expert_ids: [n, K] the experts this sequence's n new tokens routed to at `layer`."""
        np.add.at(self.counts[phase, layer], expert_ids.reshape(-1), 1)

    @property
    def prefill(self) -> np.ndarray:
        return self.counts[PREFILL]

    @property
    def decode(self) -> np.ndarray:
        return self.counts[DECODE]

    def total(self) -> np.ndarray:
        """[L, E] prefill and decode together."""
        return self.counts.sum(axis=0)
