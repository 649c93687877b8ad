"""The cache policy interface, and the two recency/frequency baselines (LRU, LFU).

A cache policy decides which resident expert to evict, and which experts to fetch ahead of need.

A policy sees only the routing (which experts each layer used, step by step) and answers with
keys (layer, expert). It is plain Python over small containers, with no tensors, so trace replay
can run the very code the runtime runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

Key = tuple[int, int]  # (layer, expert)


class CachePolicy(ABC):
    """The interface. Subclasses choose victims; by default they prefetch nothing (on-demand
    loading only)."""

    name = "base"
    # True: before each layer's experts are acquired, the executor applies the next layer's router
    # to this layer's hidden state and reports the result through lookahead()
    wants_lookahead = False

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.clock = 0  # advances once per observed layer

    def begin_batch(self) -> None:
        """A generate call starts: a new batch of sequences begins at layer 0."""

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        """token_counts: [E], tokens routed to each expert of `layer` in this step (whole batch)."""
        self.clock += 1

    def lookahead(self, layer: int, next_counts: Sequence[int]) -> None:
        """next_counts: [E], tokens that layer + 1's router, applied to `layer`'s hidden state,
        would send to each expert of layer + 1. Called before observe(layer) when wants_lookahead."""

    def sequence_finished(self, eam: np.ndarray) -> None:
        """A sequence of the batch ended. eam: [L, E] tokens it routed to each expert, prefill
        and decode summed."""

    @abstractmethod
    def victim(self, candidates: Sequence[Key]) -> Key:
        """Which of `candidates` (resident, unpinned) to evict. Never called with none."""

    def prefetch(self, layer: int) -> list[Key]:
        """After `layer` is routed: keys to load ahead, most urgent first."""
        return []


class LRUPolicy(CachePolicy):
    """Evicts the expert whose last use is oldest."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.last_use: dict[Key, int] = {}

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        super().observe(layer, token_counts)
        for expert, count in enumerate(token_counts):
            if count:
                self.last_use[(layer, expert)] = self.clock

    def victim(self, candidates: Sequence[Key]) -> Key:
        return min(candidates, key=lambda k: (self.last_use.get(k, -1), k))


class LFUPolicy(LRUPolicy):
    """Evicts the expert that served the fewest tokens so far; ties go to the least recent."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.tokens: dict[Key, int] = {}

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        super().observe(layer, token_counts)
        for expert, count in enumerate(token_counts):
            if count:
                self.tokens[(layer, expert)] = self.tokens.get((layer, expert), 0) + int(count)

    def victim(self, candidates: Sequence[Key]) -> Key:
        return min(candidates, key=lambda k: (self.tokens.get(k, 0), self.last_use.get(k, -1), k))
