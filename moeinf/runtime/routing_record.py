"""Per-token routing of one sequence's tokens in one step, kept when traces are recorded: the rows
`moeinf trace` hands to a TraceBuilder (see moeinf/runtime/traces.py for the file format)."""

from __future__ import annotations

import numpy as np

from moeinf.runtime.traces import NO_NEXT_LAYER


class RoutingRecord:
    def __init__(self, tokens: int, num_moe_layers: int, top_k: int):
        shape = (tokens, num_moe_layers, top_k)
        self.experts = np.zeros(shape, dtype=np.int16)  # [n, L, K]
        self.weights = np.zeros(shape, dtype=np.float16)  # [n, L, K]
        # [n, L, K]: experts layer l + 1's router picks from layer l's residual stream
        self.lookahead = np.full(shape, NO_NEXT_LAYER, dtype=np.int16)
