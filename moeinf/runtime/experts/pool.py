"""The device expert pool, an ExpertSource: a fixed number of slots, experts streamed in from the
host tier and the disk store, evictions and prefetches decided by a CacheController running a
policy (the pool is its LoadMechanism), every transfer counted.

Slots live in one buffer of records, records: [S, record_nbytes] uint8, laid out exactly like a
record of the expert store (loaders/expert_record.py: w13 then w2, then any biases, in the compute
dtype; or their int8 / int4 arrays). w13 [S, 2F, D], w2 [S, D, F] (float tensors or
QuantizedMatrix; and b13 [S, 2F], b2 [S, D] for families with expert biases) are strided views
into it, so a load is one contiguous copy per expert (on the CPU a direct read from the store into
the slot), and the kernels read any slot through the slot table unchanged.

Hybrid execution (host_compute "auto" or "always", with a host tier of at least one layer's
experts): the controller's Placement may compute a miss on the host instead. Its record is then
pinned in the host tier for the layer (read from the store straight into the tier if not there)
and the host kernels read it there: LayerExperts.host carries the tier's views, laid out like the
slots'. The link stays free for promotions. On the CPU the host kernels compute every expert, the
same from either buffer, so such runs equal the resident run bit for bit. On CUDA (and with
kernels="triton") the device computes the slots' experts in Triton while a worker thread computes
the host's (kernels/hybrid_experts.py), and the placement's costs are measured at start-up
(_measured_cuda_costs): host-computed experts round differently from the resident run's.
Quantized records split the same way (quant_moe.py on the device, host_quant_experts.py on the
host).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from moeinf.errors import OffloadConfigError, StoreChecksumError
from moeinf.kernels import host_experts, hybrid_experts
from moeinf.loaders.expert_record import RecordLayout, record_views
from moeinf.loaders.expert_store import ExpertStore, aligned_buffer
from moeinf.runtime.cache.controller import CacheController
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.cache.placement import HOST, ExpertCosts, Placement
from moeinf.runtime.cache.policy import CachePolicy
from moeinf.runtime.cache.residency import Key
from moeinf.runtime.experts.cuda_copy import CudaSlotCopier, cuda_copies_available
from moeinf.runtime.experts.host_cache import HostCache
from moeinf.runtime.experts.source import LayerExperts, LayerRouting
from moeinf.runtime.experts.transfer import TransferQueue

# The FLOP rate both sides of a CPU-only placement get: equal on both, it never tips the choice
# (only the load does), so it is a round figure rather than a measurement.
SAME_CPU_FLOPS_PER_S = 1e12


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
        host_compute: str = "never",
    ):
        layout = store.layout
        self.store, self.layout, self.policy = store, layout, policy
        self.num_experts = store.num_experts
        self.device = device
        self.num_slots = num_slots
        self.tracks_routing = True  # the policy learns from finished sequences' EAMs
        S, R = num_slots, layout.record_nbytes
        if device.type == "cuda":
            self.records = torch.empty((S, R), dtype=torch.uint8, device=device)
            self._records_np = None
        else:
            self._records_np = aligned_buffer(S * R).reshape(S, R)  # aligned: O_DIRECT reads land in slots
            self.records = torch.from_numpy(self._records_np)
        self.views = record_views(self.records, layout)  # w13 [S, 2F, D], w2 [S, D, F], ... into the slots
        self.copier = CudaSlotCopier(self.records, layout.payload_nbytes) if cuda_copies_available(device) else None
        if device.type == "cuda" and self.copier is None:
            self._staging = threading.local()  # torch copies from per-thread pinned buffers
        self.host = HostCache(host_records, R, pinned=device.type == "cuda")
        self.stats = TrafficCounters()
        placement = self._placement(host_compute, host_records, dtype)
        self._host_views = record_views(torch.from_numpy(self.host.buffer), layout) if placement else None
        # where the host's share of a layer runs while the device computes its own (CUDA: two memories)
        cuda_hybrid = placement is not None and device.type == "cuda"
        self._host_worker = ThreadPoolExecutor(1, thread_name_prefix="moeinf-host") if cuda_hybrid else None
        self.controller = CacheController(S, store.num_experts, policy, self, self.stats, placement)
        self._tickets: dict[int, Future] = {}  # slot -> its load in flight
        self.queue = TransferQueue(self._load, io_threads)

    def _placement(self, host_compute: str, host_records: int, dtype: torch.dtype) -> Placement | None:
        """The controller's Placement, or None where every miss is fetched. The host computes from
        the host tier, so it needs one that holds a layer's experts; "auto" without one fetches."""
        if host_compute == "never":
            return None
        if host_records < self.num_experts:
            if host_compute == "always":
                raise OffloadConfigError(
                    f"host_compute 'always' computes misses from the host tier: expected host_budget to hold at "
                    f"least one layer's {self.num_experts} expert records, found {host_records}"
                )
            return None
        if self.device.type == "cuda":
            return Placement(host_compute, self._measured_cuda_costs(dtype))
        return Placement(host_compute, self._measured_costs())

    def _measured_cuda_costs(self, dtype: torch.dtype) -> ExpertCosts:
        """The placement's costs on this machine, measured once at start-up on one expert record:
        the link (a pinned host-tier record copied into a slot), the host kernels (one record,
        1 and MAX_TOKENS tokens) and the device kernels (one slot, 1 and 256 tokens). Timings
        take the best of three, after a warm-up (Numba's compile and Triton's are not costs)."""
        layout, P = self.layout, self.layout.payload_nbytes
        params = expert_params(layout)
        D = layout.w13_shape[1]

        def best(run) -> float:
            run()
            times = []
            for _ in range(3):
                torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                run()
                torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - start)
            return max(min(times), 1e-9)

        record = torch.from_numpy(self.host.buffer[0])  # pinned; zeros until the tier fills
        link_s = best(lambda: self.records[0].copy_(record, non_blocking=True))
        host_views = (
            self._host_views
            if self._host_views is not None
            else record_views(torch.from_numpy(self.host.buffer), layout)
        )
        w13, w2, b13, b2, input_perm = host_views
        first_only = torch.tensor([0] + [-1] * (self.num_experts - 1))
        second = host_experts.SecondBuffers(first_only, w13, w2, b13, b2, input_perm=input_perm)

        def on_host(tokens: int):
            x = torch.zeros((tokens, D), dtype=dtype)
            ids, weights = torch.zeros((tokens, 1), dtype=torch.int64), torch.ones((tokens, 1))
            return lambda: hybrid_experts.host_share(x, ids, weights, second)

        def on_device(tokens: int):
            from moeinf.kernels import moe, quant_moe

            x = torch.zeros((tokens, D), dtype=dtype, device=self.device)
            ids = torch.zeros((tokens, 1), dtype=torch.int64, device=self.device)
            weights = torch.ones((tokens, 1), device=self.device)
            slots = torch.tensor([0] + [-1] * (self.num_experts - 1), device=self.device)
            views = self.views
            if layout.quantized:
                return lambda: quant_moe.fused_quant_moe(
                    x, ids, weights, views.w13, views.w2, slots, input_perm=views.input_perm
                )
            return lambda: moe.fused_moe(x, ids, weights, views.w13, views.w2, slots, b13=views.b13, b2=views.b2)

        many = host_experts.MAX_TOKENS
        host_1, host_many = best(on_host(1)), best(on_host(many))
        device_1, device_many = best(on_device(1)), best(on_device(256))
        return ExpertCosts(
            P, 2 * params, P / link_s, P / host_1, 2 * params * many / host_many, P / device_1,
            2 * params * 256 / device_many,
        )  # fmt: skip

    def _measured_costs(self) -> ExpertCosts:
        """The placement's costs on this machine. On the CPU the 'device' slots and the host tier
        are the same memory read by the same kernels, so a load (one record copied tier to slot,
        timed here once) only ever adds to the compute: "auto" computes every decode miss from
        the tier."""
        R = self.layout.record_nbytes
        src, dst = np.ones(R, np.uint8), np.empty(R, np.uint8)
        start = time.perf_counter()
        dst[:] = src
        copy_bytes_per_s = R / max(time.perf_counter() - start, 1e-9)
        params = expert_params(self.layout)
        same = copy_bytes_per_s, SAME_CPU_FLOPS_PER_S  # host and "device": one memory, one kernel
        return ExpertCosts(self.layout.payload_nbytes, 2 * params, copy_bytes_per_s, *same, *same)

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
            # a damaged record is never computed with: rebuild its bytes from the checkpoint, and
            # write them back so that later reads (this run's and the next's) find it whole
            self.stats.add(checksum_failures=1, bytes_from_disk=self.layout.payload_nbytes)
            self.store.record_from_checkpoint(layer, expert, buffer)
            if self.store.repair_record(layer, expert, buffer):
                self.stats.add(records_repaired=1)

    # ------------------------------------------------------------------ the controller's mechanism

    def start_load(self, key: Key, slot: int, urgent: bool) -> None:
        self._tickets[slot] = self.queue.submit(key, slot, urgent)

    def promote(self, key: Key, slot: int) -> None:
        self.queue.promote(self._tickets[slot], key, slot)

    def try_cancel(self, slot: int) -> bool:
        if self.queue.cancel(self._tickets[slot]):
            del self._tickets[slot]
            return True
        return False

    def wait(self, slot: int) -> None:
        start = time.perf_counter()
        try:
            self._tickets.pop(slot).result()
        finally:
            self.stats.add(stall_s=time.perf_counter() - start)

    def finished(self) -> list[int]:
        done = [slot for slot, ticket in self._tickets.items() if ticket.done()]
        for slot in done:
            self._tickets.pop(slot).result()  # a failed load raises here, not silently later
        return done

    # ------------------------------------------------------------------ compute side (ExpertSource)

    @property
    def wants_lookahead(self) -> bool:
        return self.controller.wants_lookahead

    def begin_batch(self) -> None:
        self.controller.begin_batch()

    def acquire(self, layer: int, routing: LayerRouting, next_routing: LayerRouting | None) -> LayerExperts:
        """Makes the experts `routing` sends tokens to resident and pins them until release()."""
        next_counts = None if next_routing is None else next_routing.counts().tolist()
        decode_sized = routing.ids.shape[0] <= host_experts.MAX_TOKENS
        table = self.controller.acquire(layer, routing.counts().tolist(), next_counts, allow_host=decode_sized)
        if self.copier is not None:
            self.copier.compute_waits_for([slot for slot in table if slot >= 0])
        host = self._host_share(layer, table)
        slots = torch.tensor([max(slot, -1) for slot in table], dtype=torch.int64, device=self.device)  # [E]
        views = self.views
        return LayerExperts(slots, views.w13, views.w2, views.b13, views.b2, host, views.input_perm)

    def _host_share(self, layer: int, table: list[int]) -> host_experts.SecondBuffers | None:
        """The host tier's records of the experts the controller placed on the host, pinned there
        for the layer (read from the store into the tier where missing; the wait counts as stall)."""
        experts = [expert for expert, slot in enumerate(table) if slot == HOST]
        if not experts:
            return None
        start = time.perf_counter()
        records = [-1] * len(table)
        for expert in experts:
            record = self.host.pin((layer, expert), lambda row, e=expert: self._read_record((layer, e), row))
            if record is None:  # the budget check keeps a layer's experts within the tier
                raise RuntimeError(f"host tier of {self.host.num_records} records is all pinned; expected room")
            records[expert] = record
        self.stats.add(stall_s=time.perf_counter() - start)
        records = torch.tensor(records, dtype=torch.int64)
        w13, w2, b13, b2, input_perm = self._host_views
        return host_experts.SecondBuffers(records, w13, w2, b13, b2, self._host_worker, input_perm)

    def release(self, layer: int) -> None:
        self.host.unpin_all()
        slots = self.controller.release()
        if self.copier is not None:
            self.copier.compute_released(slots)

    def sequence_finished(self, eam: np.ndarray) -> None:
        self.controller.sequence_finished(eam)

    def resident_experts(self) -> int:
        return self.controller.resident_experts()

    def close(self) -> None:
        if self._host_worker is not None:
            self._host_worker.shutdown()
        self.queue.close()
        self.store.close()


def expert_params(layout: RecordLayout) -> int:
    """Weights of one expert, w13's and w2's (the FLOPs per token are twice this)."""
    (F2, D), (_, F) = layout.w13_shape, layout.w2_shape
    return F2 * D + D * F
