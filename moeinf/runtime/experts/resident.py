"""Every routed expert resident on the compute device, in slot-indexed buffers: the trivial
ExpertSource (nothing to load, pin, evict or learn).

The buffers have the layout of the device expert pool (one buffer per weight kind, [S, ...], slot
= layer * E + expert; quantized experts: records packed as the store packs them, and views into
them), and the executor reads experts only through the LayerExperts acquire()
returns, so the pool, with fewer slots than experts, takes this class's place without touching the
executor or the kernels.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from tqdm import tqdm

from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_format import ExpertFormat
from moeinf.loaders.expert_record import RecordLayout, pack_record, record_views
from moeinf.loaders.expert_store import aligned_buffer
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.experts.source import LayerExperts, LayerRouting


class ResidentExperts:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype,
        progress: bool = True,
        fmt: ExpertFormat | None = None,
    ):
        spec = checkpoint.spec
        L, E = spec.num_moe_layers, spec.num_experts
        # slot_table: [L, E] slot of each (layer, expert); slot = layer * E + expert
        self.slot_table = torch.arange(L * E, device=device, dtype=torch.int64).view(L, E)
        self.num_slots = L * E
        self.wants_lookahead = self.tracks_routing = False
        self.policy = None
        self.input_perm = None  # [S, D] int32 for act-order quantized records
        bar = tqdm(total=L * E, desc="experts", unit="expert", disable=not progress)
        if fmt is not None and fmt.quantized:
            self._load_records(checkpoint, device, fmt, bar)
        else:
            self._load_float(checkpoint, device, dtype, bar)
        bar.close()
        self._stats = TrafficCounters()
        # hits counted on the device and read when the counters are: reading them per layer would
        # make the host wait for the GPU at every layer, and the host could no longer queue ahead
        self._pending_hits = torch.zeros((), dtype=torch.int64, device=device)
        self._pending_lock = threading.Lock()  # stats may be read from another thread (moeinf serve's /stats)

    def _load_float(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, bar: tqdm) -> None:
        """Stacks of every expert in `dtype`: w13 [S, 2F, D] gate then up rows, w2 [S, D, F]."""
        spec = checkpoint.spec
        L, E, D, F = spec.num_moe_layers, spec.num_experts, spec.hidden_size, spec.expert_ffn
        self.w13 = torch.empty((L * E, 2 * F, D), device=device, dtype=dtype)  # [S, 2F, D]: gate, up
        self.w2 = torch.empty((L * E, D, F), device=device, dtype=dtype)  # [S, D, F]: down
        self.b13 = self.b2 = None  # [S, 2F] and [S, D] for families with expert biases
        if spec.expert_bias:
            self.b13 = torch.empty((L * E, 2 * F), device=device, dtype=dtype)
            self.b2 = torch.empty((L * E, D), device=device, dtype=dtype)
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

    def _load_records(self, checkpoint: Checkpoint, device: torch.device, fmt: ExpertFormat, bar: tqdm) -> None:
        """Quantized experts: every expert's record, packed exactly as the expert store packs it
        (records [S, record_nbytes] uint8), and the kernels' views into them, so that an offloaded
        run reads the very bytes this one does."""
        spec = checkpoint.spec
        layout = RecordLayout.for_format(spec.hidden_size, spec.expert_ffn, fmt, biases=spec.expert_bias)
        S, E = self.num_slots, spec.num_experts
        host = aligned_buffer(S * layout.record_nbytes).reshape(S, layout.record_nbytes)
        for slot in range(S):
            pack_record(checkpoint, layout, slot // E, slot % E, host[slot])
            bar.update()
        self.records = torch.from_numpy(host).to(device)  # [S, record_nbytes]
        views = record_views(self.records, layout)
        self.w13, self.w2, self.b13, self.b2, self.input_perm = views

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
        return LayerExperts(self.slot_table[layer], self.w13, self.w2, self.b13, self.b2, input_perm=self.input_perm)

    def count_hits(self, hits: int) -> None:
        """Hits of layers computed without acquire() (the executor's host decode block reads the
        buffers itself): `hits` distinct experts used, summed over those layers."""
        self._stats.add(hits=hits)

    def release(self, layer: int) -> None:
        """Nothing to unpin: resident experts are never evicted."""

    def sequence_finished(self, eam: np.ndarray) -> None:
        """Nothing learns from it (tracks_routing is False, so it is not called)."""

    def resident_experts(self) -> int:
        return self.slot_table.numel()

    def close(self) -> None:
        """Nothing to stop: no I/O threads."""
