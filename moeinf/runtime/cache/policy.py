"""The cache policy interface, and the two recency/frequency baselines (LRU, LFU).

A cache policy decides which resident expert to evict, and which experts to fetch ahead of need.

A policy sees only the routing (which experts each layer used, step by step) and answers with
keys (layer, expert), or with slots where it chooses among the residency's slots. It is plain
Python, numpy and Numba over small arrays, with no tensors, so trace replay can run the very code
the runtime runs.

Victims: the controller hands victim_slot() the residency's slot arrays (runtime/cache/residency.py),
which are kept up to date as slots change state; the policy scores the candidates in one
compiled pass (scorer.py) over per-expert state it keeps as [L, E] arrays. No eviction builds a
list or a tuple per slot, so its cost in Python does not grow with the pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from moeinf.runtime.cache.residency import Key
from moeinf.runtime.cache.scorer import lowest_slot


class CachePolicy(ABC):
    """The interface. Subclasses choose victims; by default they prefetch nothing (on-demand
    loading only)."""

    name = "base"
    # True: at each layer the executor also applies the next layer's router to this layer's hidden
    # state, and the controller reports what it picks through lookahead() before observe()
    wants_lookahead = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "victim" in cls.__dict__ and "victim_slot" not in cls.__dict__:  # the controller would never call it
            raise TypeError(
                f"{cls.__name__}: expected victims chosen by victim_slot(layer_of, expert_of, evictable), "
                "found only victim(candidates) overridden; the controller calls victim_slot"
            )

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
    def victim_slot(self, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray) -> int:
        """Which slot to evict. layer_of, expert_of: [S] int64 the (layer, expert) each slot holds
        (-1: empty); evictable: [S] bool the candidates (READY, unpinned), at least one. All three
        are read-only. Returns a slot where evictable is True; where the policy's priorities tie,
        it breaks the tie as it documents (by slot, lowest first, unless it says otherwise)."""

    def prefetch_victim_slot(self, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray) -> int:
        """Which slot a prefetch may evict (same arguments as victim_slot), or -1: none, and the
        prefetch is dropped. A prefetch is a guess; a policy can refuse to trade an expert it
        expects back for one. By default the prefetch evicts what a miss would."""
        return self.victim_slot(layer_of, expert_of, evictable)

    def promotion_victim_slot(
        self, key: Key, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray
    ) -> int:
        """Which slot promoting `key` (a host-computed expert, see promotion()) may evict (same
        arguments as victim_slot), or -1: none, and it stays on the host. By default what a
        prefetch would evict."""
        return self.prefetch_victim_slot(layer_of, expert_of, evictable)

    def prefetch(self, layer: int) -> list[Key]:
        """After `layer` is routed: keys to load ahead, most urgent first."""
        return []

    def promotion(self, layer: int, candidates: Sequence[int], token_counts: Sequence[int]) -> int:
        """Which of `layer`'s experts the host computed this step (candidates, ascending) to load
        into a device slot for later steps (hybrid placement, one at a time while the link is
        idle). By default the one with the most tokens, the lowest on ties."""
        return max(candidates, key=lambda e: token_counts[e])


class LRUPolicy(CachePolicy):
    """Evicts the expert whose last use is oldest; ties (never used) go to the lowest (layer,
    expert)."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.last_use = np.full((num_layers, num_experts), -1, np.int64)  # [L, E] clock of the last use, -1: none

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        super().observe(layer, token_counts)
        self.last_use[layer, np.asarray(token_counts) != 0] = self.clock

    def victim_slot(self, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray) -> int:
        # one key: passed as both of lowest_slot's, the second never decides
        return lowest_slot(self.last_use, self.last_use, layer_of, expert_of, evictable)


class LFUPolicy(LRUPolicy):
    """Evicts the expert that served the fewest tokens so far; ties go to the least recent, then
    to the lowest (layer, expert)."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.tokens = np.zeros((num_layers, num_experts), np.int64)  # [L, E] tokens served so far

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        super().observe(layer, token_counts)
        self.tokens[layer] += np.asarray(token_counts).astype(np.int64)

    def victim_slot(self, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray) -> int:
        return lowest_slot(self.tokens, self.last_use, layer_of, expert_of, evictable)
