"""What a replay measured: hit rates, bytes moved, and virtual time per step and per output token."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReplayResult:
    policy: str
    capacity_slots: int
    link: str
    hit_rate: float  # (hits + prefetch_hits) / accesses
    misses: int
    bytes: int  # moved over the link (landed loads, prefetches included)
    stall_s: float  # virtual time compute waited for loads
    tpot_s: float  # virtual time per decode token (per step if the trace has no decode tokens)
    total_s: float  # virtual time of the whole replay
    accesses: int  # (layer, expert) pairs steps needed
    late_prefetch_hits: int  # prefetch hits whose load had not landed when the layer needed it
    counters: dict[str, float]
    step_s: np.ndarray = field(repr=False)  # [steps] virtual time of each step
    step_compute_s: np.ndarray = field(repr=False)  # [steps] its compute alone
    step_loads: np.ndarray = field(repr=False)  # [steps] loads it issued (demand + prefetch)
    step_decode: np.ndarray = field(repr=False)  # [steps] bool: a decode step

    @property
    def ready_hit_rate(self) -> float:
        """(hits + prefetch hits that had landed) / accesses: hit_rate counts a prefetch still in
        flight as a hit, though the layer waits for it like for a miss."""
        ready = self.counters["hits"] + self.counters["prefetch_hits"] - self.late_prefetch_hits
        return ready / self.accesses if self.accesses else 0.0

    def summary(self) -> dict[str, float]:
        """The figures bench/policy.py reports."""
        return {
            "hit_rate": self.hit_rate,
            "misses": self.misses,
            "bytes": self.bytes,
            "stall_s": self.stall_s,
            "tpot_s": self.tpot_s,
        }


def per_output_token(values: np.ndarray, decode: np.ndarray) -> float:
    """The mean of values [steps] over the decode steps (over every step if there are none)."""
    chosen = values[decode] if decode.any() else values
    return float(chosen.mean()) if len(chosen) else 0.0
