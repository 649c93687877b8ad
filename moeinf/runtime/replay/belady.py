"""Belady's MIN, the offline optimum for replay only, and the lower bound on time per token it gives."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache.policy import CachePolicy
from moeinf.runtime.cache.residency import Key
from moeinf.runtime.replay.cost import ReplayProfile
from moeinf.runtime.replay.result import ReplayResult, per_output_token
from moeinf.runtime.replay.steps import trace_steps
from moeinf.runtime.traces import Trace


class BeladyPolicy(CachePolicy):
    """Belady's MIN, for replay only: it is told the whole future. The victim is the candidate
    whose next use is farthest away (never used again first); nothing is prefetched, so its loads
    are the fewest any policy needs for the same accesses.

    accesses: one (layer, experts needed) per observe() call the replay will make, in order.
    observe() checks each call against it, so a policy built for one trace cannot silently run
    on another."""

    name = "belady"

    def __init__(self, num_layers: int, num_experts: int, accesses: Sequence[tuple[int, Sequence[int]]]):
        super().__init__(num_layers, num_experts)
        self._accesses = [(layer, tuple(sorted(experts))) for layer, experts in accesses]
        # following[t]: for each expert needed at access t, the index of its key's next access
        self._following: list[dict[int, float]] = [{} for _ in self._accesses]
        seen: dict[Key, float] = {}
        for t in range(len(self._accesses) - 1, -1, -1):
            layer, experts = self._accesses[t]
            for expert in experts:
                self._following[t][expert] = seen.get((layer, expert), math.inf)
                seen[(layer, expert)] = t
        # next_use: [L, E] each key's next access index as of the last observe (inf: none known)
        self.next_use = np.full((num_layers, num_experts), math.inf)

    @classmethod
    def from_trace(cls, trace: Trace) -> BeladyPolicy:
        accesses = []
        for s in range(trace.num_sequences):
            for step in trace_steps(trace, s):
                for layer, counts in enumerate(step.counts):
                    accesses.append((layer, [e for e, c in enumerate(counts) if c]))
        return cls(trace.num_layers, trace.num_experts, accesses)

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        t = self.clock
        super().observe(layer, token_counts)
        needed = tuple(e for e, count in enumerate(token_counts) if count)
        if t >= len(self._accesses) or self._accesses[t] != (layer, needed):
            expected = self._accesses[t] if t < len(self._accesses) else "the end of the trace"
            raise ReplayConfigError(
                f"belady: at access {t} expected (layer, experts) {expected}, found {(layer, needed)}; "
                "it was built for another trace"
            )
        following = self._following[t]
        self.next_use[layer, list(following)] = list(following.values())

    def victim_slot(self, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray) -> int:
        """The candidate whose next use is farthest away; ties go to the lower slot."""
        slots = np.flatnonzero(evictable)  # [C] candidates in slot order
        return int(slots[np.argmax(self.next_use[layer_of[slots], expert_of[slots]])])


def lower_bound_tpot(belady: ReplayResult, profile: ReplayProfile) -> float:
    """Per decode step, the larger of its compute and the time to move the loads Belady needed
    there, averaged: no policy moves fewer experts than MIN, and no step computes faster than with
    every expert resident. (Per step, not whole-run: a prefetcher could in principle shift loads
    between steps, so the strict bound is max(total compute, total Belady bytes / bandwidth),
    which this is never below.)"""
    if belady.policy != BeladyPolicy.name:
        raise ReplayConfigError(f"lower bound: expected a Belady replay, found one of {belady.policy!r}")
    per_step = np.maximum(belady.step_compute_s, belady.step_loads * profile.load_s)
    return per_output_token(per_step, belady.step_decode)
