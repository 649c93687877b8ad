"""Every routed expert resident on the compute device, in slot-indexed buffers: the trivial
ExpertSource (nothing to load, pin, evict or learn).

The buffers have the layout of the device expert pool (one buffer per weight kind, [S, ...], slot
= layer * E + expert), and the executor reads experts only through the LayerExperts acquire()
returns, so the pool, with fewer slots than experts, takes this class's place without touching the
executor or the kernels.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from tqdm import tqdm

from moeinf.loaders.checkpoint import Checkpoint
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.experts.source import LayerExperts, LayerRouting


class ResidentExperts:
    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, progress: bool = True):
        spec = checkpoint.spec
        L, E, D, F = spec.num_moe_layers, spec.num_experts, spec.hidden_size, spec.expert_ffn
        self.w13 = torch.empty((L * E, 2 * F, D), device=device, dtype=dtype)  # [S, 2F, D]: gate, up
        self.w2 = torch.empty((L * E, D, F), device=device, dtype=dtype)  # [S, D, F]: down
        self.b13 = self.b2 = None  # [S, 2F] and [S, D] for families with expert biases
        if spec.expert_bias:
            self.b13 = torch.empty((L * E, 2 * F), device=device, dtype=dtype)
            self.b2 = torch.empty((L * E, D), device=device, dtype=dtype)
        # slot_table: [L, E] slot of each (layer, expert); slot = layer * E + expert
        self.slot_table = torch.arange(L * E, device=device, dtype=torch.int64).view(L, E)
        self.num_slots = L * E
        self.wants_lookahead = self.tracks_routing = False
        self.policy = None
        bar = tqdm(total=L * E, desc="experts", unit="expert", disable=not progress)
        for layer in range(L):
            for expert in range(E):
                slot = layer * E + expert
                weights = checkpoint.expert_weights(layer, expert)
                self.w13[slot].copy_(weights.w13)
                self.w2[slot].copy_(weights.w2)
                if self.b13 is not None:
                    self.b13[slot].copy_(weights.b13)
                    self.b2[slot].copy_(weights.b2)
                bar.update()
        bar.close()
        self._stats = TrafficCounters()
        # hits counted on the device and read when the counters are: reading them per layer would
        # make the host wait for the GPU at every layer, and the host could no longer queue ahead
        self._pending_hits = torch.zeros((), dtype=torch.int64, device=device)
        self._pending_lock = threading.Lock()  # stats may be read from another thread (moeinf serve's /stats)

    @property
    def stats(self) -> TrafficCounters:
        """The traffic counters: only hits, every needed expert being resident."""
        with self._pending_lock:
            pending = int(self._pending_hits)  # the one wait for the device, when counters are read
            self._pending_hits.zero_()
        self._stats.add(hits=pending)
        return self._stats

    def begin_batch(self) -> None:
        """Nothing to reset: no policy."""

    def acquire(self, layer: int, routing: LayerRouting, next_routing: LayerRouting | None) -> LayerExperts:
        """The slots of `layer`'s experts (every one resident, so nothing loads or needs pinning)."""
        if routing.ids.device.type == "cpu":  # no device to wait for: counted at once, on the host
            self._stats.add(hits=int(np.count_nonzero(routing.counts())))
        else:
            with self._pending_lock:
                self._pending_hits += (routing.device_counts() > 0).sum()
        return LayerExperts(self.slot_table[layer], self.w13, self.w2, self.b13, self.b2)

    def release(self, layer: int) -> None:
        """Nothing to unpin: resident experts are never evicted."""

    def sequence_finished(self, eam: np.ndarray) -> None:
        """Nothing learns from it (tracks_routing is False, so it is not called)."""

    def resident_experts(self) -> int:
        return self.slot_table.numel()

    def close(self) -> None:
        """Nothing to stop: no I/O threads."""
