"""The device expert pool: a fixed number of slots, experts streamed in from the host tier and the
disk store, evictions chosen by a policy, every transfer counted.

Slots live in one buffer of records, records: [S, record_nbytes] uint8, laid out exactly like a
record of the expert store (w13 then w2, in the compute dtype). w13 [S, 2F, D] and w2 [S, D, F]
are strided views into it, so a load is one contiguous copy per expert (on the CPU a direct read
from the store into the slot), and the kernels read any slot through the slot table unchanged.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import torch

from moeinf.errors import StoreChecksumError
from moeinf.loaders.expert_store import ExpertStore, aligned_buffer
from moeinf.runtime.cuda_copy import CudaSlotCopier, cuda_copies_available
from moeinf.runtime.host_cache import HostCache
from moeinf.runtime.policies import CachePolicy
from moeinf.runtime.residency import Key, Residency, SlotState
from moeinf.runtime.transfer import TransferQueue

COUNTERS = (
    "hits",  # needed experts already resident (not counting unused prefetches)
    "misses",  # needed experts loaded on demand
    "prefetches",  # prefetch loads issued
    "prefetch_hits",  # needed experts that a prefetch had loaded or was loading
    "prefetch_wasted",  # prefetched experts evicted or cancelled before any use
    "prefetch_cancelled",
    "evictions",
    "host_hits",  # loads served from the host tier
    "checksum_failures",  # store records that failed their checksum and were re-read from the checkpoint
    "bytes_to_device",
    "bytes_from_disk",
    "stall_s",  # time the compute thread waited for loads
)


class PoolStats:
    """Counters updated from the compute thread and the I/O workers."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


class ExpertPool:
    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        host_records: int,
        device: torch.device,
        dtype: torch.dtype,
        policy: CachePolicy,
        io_threads: int,
    ):
        layout = store.layout
        self.store, self.layout, self.policy = store, layout, policy
        self.num_experts = store.num_experts
        self.device = device
        S, R = num_slots, layout.record_nbytes
        if device.type == "cuda":
            self.records = torch.empty((S, R), dtype=torch.uint8, device=device)
            self._records_np = None
        else:
            self._records_np = aligned_buffer(S * R).reshape(S, R)  # aligned: O_DIRECT reads land in slots
            self.records = torch.from_numpy(self._records_np)
        itemsize = torch.empty((), dtype=dtype).element_size()
        flat = self.records.view(-1).view(dtype)
        (F2, D), (_, F) = layout.w13_shape, layout.w2_shape
        self.w13 = flat.as_strided((S, F2, D), (R // itemsize, D, 1))  # [S, 2F, D]
        self.w2 = flat.as_strided((S, D, F), (R // itemsize, F, 1), layout.w13_nbytes // itemsize)  # [S, D, F]
        self.copier = CudaSlotCopier(self.records, layout.payload_nbytes) if cuda_copies_available(device) else None
        if device.type == "cuda" and self.copier is None:
            self._staging = threading.local()  # torch copies from per-thread pinned buffers
        self.host = HostCache(host_records, R, pinned=device.type == "cuda")
        self.residency = Residency(S)
        self.stats = PoolStats()
        self._tickets: dict[int, Future] = {}  # slot -> its load in flight
        self._pinned: list[int] = []  # slots pinned by the layer computing now
        self.queue = TransferQueue(self._load, io_threads)

    # ------------------------------------------------------------------ worker side

    def _load(self, key: Key, slot: int) -> None:
        """Runs on an I/O worker: brings the record of `key` into `slot`."""
        buffer = self._buffer_for(slot)
        if self.host.copy_out(key, buffer):
            self.stats.add(host_hits=1)
        else:
            self._read_record(key, buffer)
            self.host.copy_in(key, buffer)
        if self.copier is not None:
            self.copier.copy_to_slot(slot)
        elif self.device.type == "cuda":
            src = torch.from_numpy(buffer[: self.layout.payload_nbytes])
            self.records[slot, : self.layout.payload_nbytes].copy_(src)
        self.stats.add(bytes_to_device=self.layout.payload_nbytes)

    def _buffer_for(self, slot: int) -> np.ndarray:
        if self.copier is not None:
            return self.copier.staging()
        if self._records_np is not None:
            return self._records_np[slot]
        local = self._staging
        if not hasattr(local, "buffer"):
            local.buffer = torch.empty(self.layout.record_nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return local.buffer

    def _read_record(self, key: Key, buffer: np.ndarray) -> None:
        layer, expert = key
        try:
            self.store.read_into(layer, expert, buffer)
            self.stats.add(bytes_from_disk=self.layout.record_nbytes)
        except StoreChecksumError:
            # a damaged record is never computed with: rebuild its bytes from the checkpoint
            self.stats.add(checksum_failures=1, bytes_from_disk=self.layout.payload_nbytes)
            self.store.record_from_checkpoint(layer, expert, buffer)

    # ------------------------------------------------------------------ compute side

    def acquire(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """Makes the experts that `topk_ids` [T, K] routes to resident and pins them until
        release(). Returns the slot of each expert of `layer`, [E] int64 (-1: not resident)."""
        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts).tolist()
        needed = [e for e, c in enumerate(counts) if c]
        self.policy.observe(layer, counts)
        self._reap()
        self._cancel_stale(layer, set(needed))
        res = self.residency
        missing = []
        for expert in needed:
            key = (layer, expert)
            slot = res.slot(key)
            if slot is None:
                missing.append(key)
                continue
            if key in res.prefetched:
                res.prefetched.discard(key)
                self.stats.add(prefetch_hits=1)
                if res.state[slot] == SlotState.LOADING:
                    self.queue.promote(self._tickets[slot], key, slot)
            else:
                self.stats.add(hits=1)
            res.pin(slot)
        for key in missing:
            slot = self._claim(key, wait=True)
            res.pin(slot)
            self._tickets[slot] = self.queue.submit(key, slot, urgent=True)
        self.stats.add(misses=len(missing))
        for key in self.policy.prefetch(layer):
            self._prefetch(key)
        slots = [res.slot((layer, e)) for e in needed]
        start = time.perf_counter()
        for slot in slots:
            if res.state[slot] == SlotState.LOADING:
                self._finish(slot)
        self.stats.add(stall_s=time.perf_counter() - start)
        if self.copier is not None:
            self.copier.compute_waits_for(slots)
        self._pinned = slots
        table = [-1] * self.num_experts
        for expert, slot in zip(needed, slots):
            table[expert] = slot
        return torch.tensor(table, dtype=torch.int64, device=self.device)

    def release(self, layer: int) -> None:
        if self.copier is not None:
            self.copier.compute_released(self._pinned)
        for slot in self._pinned:
            self.residency.unpin(slot)
        self._pinned = []

    def _finish(self, slot: int) -> None:
        """Waits for the load into `slot`; a failed load frees the slot and raises."""
        ticket = self._tickets.pop(slot)
        try:
            ticket.result()
        except BaseException:
            key = self.residency.key_in[slot]
            self.residency.pins[slot] = 0
            self.residency.evict(key)
            raise
        self.residency.mark_ready(slot)

    def _reap(self) -> None:
        """Marks finished loads ready, so their slots can be chosen as victims."""
        for slot in [s for s, t in self._tickets.items() if t.done() and not t.cancelled()]:
            self._finish(slot)

    def _cancel_stale(self, layer: int, needed: set[int]) -> None:
        """Prefetches for this layer that it turned out not to need, and that have not started,
        are dropped: their slots are better spent on what the next layers need."""
        res = self.residency
        for key in [k for k in res.prefetched if k[0] == layer and k[1] not in needed]:
            slot = res.slot(key)
            if res.state[slot] == SlotState.LOADING and self.queue.cancel(self._tickets[slot]):
                del self._tickets[slot]
                res.evict(key)
                self.stats.add(prefetch_cancelled=1, prefetch_wasted=1)

    def _claim(self, key: Key, wait: bool) -> int | None:
        """A slot for `key`, evicting the policy's victim if none is free. With wait, blocks on
        in-flight loads when every slot is busy; without, gives up (returns None)."""
        res = self.residency
        slot = res.free_slot()
        while slot is None:
            candidates = res.evictable()
            if candidates:
                victim = self.policy.victim(candidates)
                if victim in res.prefetched:
                    self.stats.add(prefetch_wasted=1)
                slot = res.evict(victim)
                self.stats.add(evictions=1)
                break
            loading = [s for s in res.loading() if res.pins[s] == 0]
            if not wait or not loading:
                if wait:
                    raise RuntimeError(f"all {res.num_slots} expert slots are pinned; the budget check should prevent this")
                return None
            start = time.perf_counter()
            self._finish(loading[0])
            self.stats.add(stall_s=time.perf_counter() - start)
        res.assign(key, slot)
        return slot

    def _prefetch(self, key: Key) -> None:
        if self.residency.slot(key) is not None:
            return
        slot = self._claim(key, wait=False)
        if slot is None:
            return
        self.residency.prefetched.add(key)
        self.stats.add(prefetches=1)
        self._tickets[slot] = self.queue.submit(key, slot, urgent=False)

    def resident_experts(self) -> int:
        return self.residency.resident()

    def close(self) -> None:
        self.queue.close()
        self.store.close()
