"""The steps replay makes of a trace: one per sequence's prefill, one per decode token."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moeinf.runtime.cache.eam import PREFILL, expert_counts
from moeinf.runtime.traces import Trace


@dataclass
class Step:
    """One forward step of one sequence: its prefill tokens together, or one decode token."""

    phase: int
    tokens: int
    counts: list[list[int]]  # [L][E] tokens routed to each expert
    active: list[int]  # [L] distinct experts routed to
    lookahead: list[list[int]] | None  # [L][E] counts of lookahead[:, l] (the last layer unused)


def trace_steps(trace: Trace, seq: int, with_lookahead: bool = False) -> Iterator[Step]:
    """The steps replay makes for sequence `seq`, in order."""
    rows = trace.sequence(seq)
    phase = trace.phase[rows]
    prefill = int(np.count_nonzero(phase == PREFILL))  # validated: prefill rows come first
    spans = ([(rows.start, rows.start + prefill)] if prefill else []) + [
        (n, n + 1) for n in range(rows.start + prefill, rows.stop)
    ]
    E = trace.num_experts
    for start, stop in spans:
        counts = expert_counts(trace.experts[start:stop], E)
        lookahead = None
        if with_lookahead and trace.lookahead is not None:
            ahead = trace.lookahead[start:stop, :-1]  # [T, L - 1, K]; the last layer has no next
            lookahead = expert_counts(ahead, E).tolist() + [[0] * E]
        yield Step(
            phase=int(trace.phase[start]),
            tokens=stop - start,
            counts=counts.tolist(),
            active=np.count_nonzero(counts, axis=1).tolist(),
            lookahead=lookahead,
        )


def max_active_experts(trace: Trace) -> int:
    """The most distinct experts one layer needs at once in any replay step: the capacity floor."""
    most = trace.top_k if trace.num_tokens else 0
    for s in range(trace.num_sequences):
        rows = trace.sequence(s)
        prefill = int(np.count_nonzero(trace.phase[rows] == PREFILL))
        if prefill > 1:
            counts = expert_counts(trace.experts[rows.start : rows.start + prefill], trace.num_experts)
            most = max(most, int(np.count_nonzero(counts, axis=1).max()))
    return most
