"""Cache policies: which resident expert to evict, and which experts to fetch ahead of need.

A policy sees only the routing (which experts each layer used, step by step) and answers with
keys (layer, expert). It is plain Python over small containers, with no tensors, so trace replay
can run the very code the runtime runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from moeinf.errors import OffloadConfigError

Key = tuple[int, int]  # (layer, expert)


class CachePolicy(ABC):
    """The interface. Subclasses choose victims; by default they prefetch nothing (on-demand
    loading only)."""

    name = "base"

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.clock = 0  # advances once per observed layer

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        """token_counts: [E], tokens routed to each expert of `layer` in this step."""
        self.clock += 1

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


POLICIES: dict[str, type[CachePolicy]] = {p.name: p for p in (LRUPolicy, LFUPolicy)}


def make_policy(policy: str | CachePolicy, num_layers: int, num_experts: int) -> CachePolicy:
    if isinstance(policy, CachePolicy):
        return policy
    if policy not in POLICIES:
        raise OffloadConfigError(f"policy: expected one of {', '.join(sorted(POLICIES))}, found {policy!r}")
    return POLICIES[policy](num_layers, num_experts)
