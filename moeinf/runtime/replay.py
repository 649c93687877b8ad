"""Trace replay: the runtime's cache controller and policies, driven by a recorded trace over a
virtual clock instead of a model over real copies.

Why: policies are compared on hit rate, bytes moved and time per output token, at scales (a 671B
model, thousands of sequences) and link speeds (PCIe 4/5, NVMe) no test machine has. DESIGN.md's
invariant "policy is pure; mechanism touches memory" makes this exact: replay runs the very
CacheController and CachePolicy objects the runtime runs; only the LoadMechanism differs (a
VirtualLink here, the ExpertPool there). The clock is virtual, so results are deterministic and
independent of the machine replaying them.

The timing model, per decode step (one token of batch 1) and per layer l:
  1. attention + router on resident dense weights: `dense_s` of virtual time passes, while the
     link keeps serving queued loads;
  2. if the policy wants lookahead and the trace has it: policy.lookahead(l, counts of the
     experts layer l + 1's router picks from layer l's hidden state) (the executor's order);
  3. controller.acquire(l, counts): hits pin, misses go to the link at on-demand priority, the
     policy's prefetches are queued behind them; the clock waits (stall) until every needed
     expert has landed;
  4. the experts run: `expert_s` passes; controller.release().
After the last layer the per-step remainder (lm head, dense FFN layers outside the trace) passes.
A sequence's prefill tokens, if any, form one step whose counts sum theirs. The link serves one
load at a time (a single copy engine / one NVMe queue saturates the link), on-demand before
prefetch, FIFO within a priority, without preemption; a prefetch that has not started can be
cancelled.

Numbers (the profiles): per-layer compute is the time to stream the weights a decode token reads
through HBM on one H100-class GPU, since batch-1 decode is memory-bound; prefill steps take the
larger of that and their FLOPs at an effective tensor-core rate. Attention's KV reads are left out
(short contexts: Mixtral reads 4 KB of KV per layer per cached token, under 1% of its 84 MB of
attention weights at 1k tokens). The figures and their sources are beside each constant below.

Also here: BeladyPolicy, the offline optimum for replay only (evict the resident expert whose
next use is farthest away; demand loads only), and the lower bound on time per output token it
gives: per decode step, the larger of the compute time and the time to move Belady's loads.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache_controller import CacheController
from moeinf.runtime.counters import TrafficCounters
from moeinf.runtime.eam import PREFILL
from moeinf.runtime.policies import POLICIES, CachePolicy, make_policy
from moeinf.runtime.residency import Key
from moeinf.runtime.traces import Trace

# ---------------------------------------------------------------------------------- assumptions


@dataclass(frozen=True)
class Gpu:
    """What the compute side of one step costs."""

    name: str
    hbm_bytes_per_s: float  # effective, for streaming weights (memory-bound decode)
    flops_per_s: float  # effective dense tensor-core rate (only prefill steps get near it)
    layer_overhead_s: float  # kernel launches and host bookkeeping per layer


# H100 SXM5: HBM3 peak 3.35 TB/s and 989 TFLOP/s dense BF16 (NVIDIA H100 datasheet). Memory-bound
# GEMV-like kernels reach roughly 75-80% of peak bandwidth, hence 2.6 TB/s; large GEMMs about 60%
# of the tensor-core peak, hence 600 TFLOP/s. About a dozen kernels per layer at 1-2 us each, and
# the runtime's per-layer Python, give ~20 us of fixed cost per layer.
H100 = Gpu("H100-SXM-class", hbm_bytes_per_s=2.6e12, flops_per_s=600e12, layer_overhead_s=20e-6)


@dataclass(frozen=True)
class ModelCost:
    """What one decode token reads, for one model. Layers are the trace's layers (MoE layers)."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int  # one routed expert: w1, w3 [F, D] and w2 [D, F]
    layer_dense_bytes: int  # per MoE layer, read every step: attention, router, shared experts
    step_bytes: int  # per step outside the MoE layers: lm head, dense-FFN layers
    bytes_per_param: float
    aliases: tuple[str, ...] = ()  # lower-case substrings of meta["model"] that name this model

    def matches(self, num_layers: int, num_experts: int, top_k: int) -> bool:
        return (self.num_layers, self.num_experts, self.top_k) == (num_layers, num_experts, top_k)


MODELS: dict[str, ModelCost] = {
    m.name: m
    for m in (
        # Mixtral-8x7B (config.json: hidden 4096, intermediate 14336, 32 heads / 8 KV heads of 128,
        # vocab 32000), served in bf16 as this runtime does (the shared traces were recorded with
        # FP8 weights, which changes routing by little and bytes not at all for us).
        # expert 3 * 4096 * 14336 * 2 B = 352 MB; attention 4096 * (4096 + 2 * 1024) + 4096 * 4096
        # params + router 4096 * 8 -> 84 MB per layer; lm head 32000 * 4096 * 2 B = 262 MB.
        ModelCost(
            "mixtral-8x7b",
            32,
            8,
            2,
            expert_bytes=3 * 4096 * 14336 * 2,
            layer_dense_bytes=(4096 * (4096 + 2 * 1024) + 4096 * 4096 + 4096 * 8) * 2,
            step_bytes=32000 * 4096 * 2,
            bytes_per_param=2,
            aliases=("mixtral-8x7b", "mixtral 8x7b"),
        ),
        # Qwen3-30B-A3B (config.json: hidden 2048, moe_intermediate 768, 32 heads / 4 KV heads of
        # 128, 48 layers, 128 experts top-8, vocab 151936, untied lm head), bf16.
        # expert 3 * 2048 * 768 * 2 B = 9.4 MB; attention 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048
        # params + router 2048 * 128 -> 40 MB per layer; lm head 151936 * 2048 * 2 B = 622 MB.
        ModelCost(
            "qwen3-30b-a3b",
            48,
            128,
            8,
            expert_bytes=3 * 2048 * 768 * 2,
            layer_dense_bytes=(2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2048 * 128) * 2,
            step_bytes=151936 * 2048 * 2,
            bytes_per_param=2,
            aliases=("qwen3-30b-a3b",),
        ),
        # DeepSeek-V3 (config.json: hidden 7168, moe_intermediate 2048, 61 layers of which the first
        # 3 are dense (intermediate 18432), 256 routed experts top-8 + 1 shared, MLA with q_lora
        # 1536, kv_lora 512, 128 heads, vocab 129280), in its native FP8 (1 B/param, block scales
        # negligible). expert 3 * 7168 * 2048 B = 44 MB. Per MoE layer: MLA (q_a 7168x1536, q_b
        # 1536x24576, kv_a 7168x576, kv_b 512x32768, o 16384x7168 = 187 M) + shared expert (44 M)
        # + router (7168x256) -> 233 MB. Per step: 3 dense layers (187 M + 3 * 7168 * 18432 each)
        # = 1.75 GB and the bf16 lm head 129280 * 7168 * 2 B = 1.85 GB.
        ModelCost(
            "deepseek-v3",
            58,
            256,
            8,
            expert_bytes=3 * 7168 * 2048,
            layer_dense_bytes=(
                7168 * 1536 + 1536 * 24576 + 7168 * 576 + 512 * 32768 + 16384 * 7168 + 3 * 7168 * 2048 + 7168 * 256
            ),
            step_bytes=3 * (7168 * 1536 + 1536 * 24576 + 7168 * 576 + 512 * 32768 + 16384 * 7168 + 3 * 7168 * 18432)
            + 129280 * 7168 * 2,
            bytes_per_param=1,
            aliases=("deepseek-v3", "deepseek v3"),
        ),
    )
}

# Effective host-to-device bandwidth of the link experts cross.
LINKS: dict[str, float] = {
    # PCIe 4.0 x16: 31.5 GB/s raw per direction; pinned H2D copies measure 24-26 GB/s (CUDA
    # bandwidthTest on A100-class hosts).
    "pcie4": 25e9,
    # PCIe 5.0 x16: 63 GB/s raw; pinned H2D copies on H100 hosts measure 50-55 GB/s.
    "pcie5": 50e9,
    # One PCIe 4.0 x4 NVMe SSD: ~7 GB/s sequential read (e.g. Samsung 990 Pro: 7.45 GB/s), the
    # bottleneck when experts come from disk with no host tier.
    "nvme": 7e9,
}


@dataclass(frozen=True)
class ReplayProfile:
    """The link experts cross, the model whose experts they are, and the GPU computing."""

    link: str
    link_bytes_per_s: float
    model: ModelCost
    gpu: Gpu = H100

    @property
    def load_s(self) -> float:
        """Time one expert occupies the link."""
        return self.model.expert_bytes / self.link_bytes_per_s

    def layer_s(self, tokens: int, active_experts: int) -> tuple[float, float]:
        """(dense_s, expert_s): one layer's attention + router, then its experts, for a step of
        `tokens` tokens that routes to `active_experts` distinct experts."""
        m, g = self.model, self.gpu
        dense_flops = 2 * tokens * m.layer_dense_bytes / m.bytes_per_param
        expert_flops = 2 * tokens * m.top_k * m.expert_bytes / m.bytes_per_param
        dense_s = max(m.layer_dense_bytes / g.hbm_bytes_per_s, dense_flops / g.flops_per_s) + g.layer_overhead_s
        expert_s = max(active_experts * m.expert_bytes / g.hbm_bytes_per_s, expert_flops / g.flops_per_s)
        return dense_s, expert_s

    def step_s(self) -> float:
        """The per-step remainder outside the MoE layers (memory-bound; one row of logits)."""
        return self.model.step_bytes / self.gpu.hbm_bytes_per_s

    def decode_compute_s(self) -> float:
        """Time of one decode token with every expert resident."""
        dense_s, expert_s = self.layer_s(1, self.model.top_k)
        return self.model.num_layers * (dense_s + expert_s) + self.step_s()


COST_FIELDS = ("expert_bytes", "layer_dense_bytes", "step_bytes", "bytes_per_param")


def model_for(meta: dict) -> ModelCost:
    """The ModelCost a trace's meta describes: its own meta["cost"] (ModelCost's byte fields, as
    `moeinf trace` records them for the model it ran), else a known model by name (meta["model"]
    containing an alias), else by shape (num_layers, num_experts, top_k)."""
    shape = (meta["num_layers"], meta["num_experts"], meta["top_k"])
    if "cost" in meta:
        cost = meta["cost"]
        if not isinstance(cost, dict) or sorted(cost) != sorted(COST_FIELDS):
            raise ReplayConfigError(f"trace meta.cost: expected the keys {', '.join(COST_FIELDS)}, found {cost!r}")
        for key in COST_FIELDS:
            value = cost[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ReplayConfigError(f"trace meta.cost.{key}: expected a positive number, found {value!r}")
        return ModelCost(str(meta.get("model", "traced")), *shape, **cost)
    name = str(meta.get("model", "")).lower()
    for model in MODELS.values():
        if any(alias in name for alias in model.aliases):
            if not model.matches(*shape):
                raise ReplayConfigError(
                    f"trace model {meta['model']!r}: expected {model.name}'s shape (layers, experts, top_k) = "
                    f"{(model.num_layers, model.num_experts, model.top_k)}, found {shape}"
                )
            return model
    for model in MODELS.values():
        if model.matches(*shape):
            return model
    known = ", ".join(f"{m.name} {(m.num_layers, m.num_experts, m.top_k)}" for m in MODELS.values())
    raise ReplayConfigError(
        f"trace model {meta.get('model')!r} with (layers, experts, top_k) = {shape}: expected one of {known}; "
        "build a ReplayProfile with its ModelCost to replay others"
    )


def profile_for(trace: Trace, link: str = "pcie4", gpu: Gpu = H100) -> ReplayProfile:
    """The profile of `link` (one of LINKS) for the model `trace` was recorded on."""
    if link not in LINKS:
        raise ReplayConfigError(f"link profile: expected one of {', '.join(LINKS)}, found {link!r}")
    return ReplayProfile(link, LINKS[link], model_for(trace.meta), gpu)


# ---------------------------------------------------------------------------------- the virtual link

URGENT, PREFETCH = 0, 1  # queue priorities, as in transfer.TransferQueue: lower runs first


class VirtualLink:
    """A LoadMechanism over a virtual clock. The clock is advanced by compute (advance) and by
    waiting on loads (wait, which counts the jump as stall); between those, the link serves its
    queue on its own, one load at a time."""

    def __init__(self, link_bytes_per_s: float, expert_bytes: int, counters: TrafficCounters | None = None):
        if link_bytes_per_s <= 0 or expert_bytes <= 0:
            raise ReplayConfigError(
                f"virtual link: expected positive bandwidth and expert size, found {link_bytes_per_s} B/s "
                f"and {expert_bytes} B"
            )
        self.expert_bytes = expert_bytes
        self.load_s = expert_bytes / link_bytes_per_s
        self.counters = counters if counters is not None else TrafficCounters()
        self.now = 0.0  # the virtual clock, seconds
        self.stall_s = 0.0
        self.bytes = 0
        self.promotions = 0  # prefetches needed before they landed (the controller promotes those)
        self._heap: list[tuple[int, int, int]] = []  # (priority, order, slot); stale entries skipped
        self._queued: dict[int, tuple[int, int]] = {}  # slot -> (priority, order) of its live entry
        self._keys: dict[int, Key] = {}  # slot -> key, for every load not yet reported landed
        self._order = itertools.count()  # FIFO within a priority
        self._busy: tuple[int, float] | None = None  # (slot, lands at) of the load on the link
        self._free_at = 0.0  # when the link finished its last load
        self._landed: dict[int, float] = {}  # slot -> landing time, not yet reported

    # LoadMechanism

    def start_load(self, key: Key, slot: int, urgent: bool) -> None:
        self._serve_until(self.now)
        if slot in self._keys:
            raise RuntimeError(
                f"start_load({key}, slot {slot}): expected an idle slot, found a load of {self._keys[slot]}"
            )
        self._keys[slot] = key
        self._push(slot, URGENT if urgent else PREFETCH)
        self._serve_until(self.now)  # an idle link starts it now

    def promote(self, key: Key, slot: int) -> None:
        self._serve_until(self.now)
        self.promotions += 1
        if self._queued.get(slot, (URGENT,))[0] == PREFETCH:
            self._push(slot, URGENT)

    def try_cancel(self, slot: int) -> bool:
        self._serve_until(self.now)
        if slot not in self._queued:
            return False
        del self._queued[slot]
        del self._keys[slot]
        return True

    def wait(self, slot: int) -> None:
        self._serve_until(self.now)
        if slot not in self._keys:
            raise RuntimeError(f"wait(slot {slot}): expected a load queued, on the link or landed, found none")
        while slot not in self._landed:
            self._serve_until(self._busy[1])
        lands = self._landed.pop(slot)
        del self._keys[slot]
        if lands > self.now:
            self.stall_s += lands - self.now
            self.counters.add(stall_s=lands - self.now)
            self.now = lands

    def finished(self) -> list[int]:
        self._serve_until(self.now)
        done = list(self._landed)
        for slot in done:
            del self._keys[slot]
        self._landed.clear()
        return done

    # the clock

    def advance(self, seconds: float) -> None:
        """Compute runs for `seconds`; the link keeps serving meanwhile."""
        self._serve_until(self.now + seconds)
        self.now += seconds

    def pending(self) -> int:
        """Loads queued or on the link."""
        return len(self._queued) + (self._busy is not None)

    def _push(self, slot: int, priority: int) -> None:
        entry = (priority, next(self._order))
        self._queued[slot] = entry
        heapq.heappush(self._heap, (*entry, slot))

    def _serve_until(self, t: float) -> None:
        """Lands every load that finishes by `t`, starting queued ones as the link frees up. Every
        entry in the queue was queued at or before self.now, so a load starts at the later of the
        link freeing up and now."""
        while True:
            if self._busy is not None:
                slot, lands = self._busy
                if lands > t:
                    return
                self._busy = None
                self._free_at = lands
                self._landed[slot] = lands
                self.bytes += self.expert_bytes
                self.counters.add(bytes_to_device=self.expert_bytes)
            while self._heap and self._queued.get(self._heap[0][2]) != self._heap[0][:2]:
                heapq.heappop(self._heap)  # cancelled, or left behind by a promotion
            if not self._heap:
                return
            _, _, slot = heapq.heappop(self._heap)
            del self._queued[slot]
            self._busy = (slot, max(self._free_at, self.now) + self.load_s)


# ---------------------------------------------------------------------------------- steps of a trace


@dataclass
class Step:
    """One forward step of one sequence: its prefill tokens together, or one decode token."""

    phase: int
    tokens: int
    counts: list[list[int]]  # [L][E] tokens routed to each expert
    active: list[int]  # [L] distinct experts routed to
    lookahead: list[list[int]] | None  # [L][E] counts of lookahead[:, l] (the last layer unused)


def _counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """ids: [T, L, K] -> [L, E] tokens per expert."""
    L = ids.shape[1]
    flat = (np.arange(L)[None, :, None] * num_experts + ids.astype(np.int64)).reshape(-1)
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


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
        counts = _counts(trace.experts[start:stop], E)
        lookahead = None
        if with_lookahead and trace.lookahead is not None:
            ahead = trace.lookahead[start:stop, :-1]  # [T, L - 1, K]; the last layer has no next
            lookahead = _counts(ahead, E).tolist() + [[0] * E]
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
            counts = _counts(trace.experts[rows.start : rows.start + prefill], trace.num_experts)
            most = max(most, int(np.count_nonzero(counts, axis=1).max()))
    return most


# ---------------------------------------------------------------------------------- Belady


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


def build_policy(policy: str | CachePolicy, trace: Trace) -> CachePolicy:
    """A policy for replaying `trace`: a CachePolicy as is, "belady", or a name in POLICIES."""
    if policy == BeladyPolicy.name:
        return BeladyPolicy.from_trace(trace)
    if not isinstance(policy, CachePolicy) and policy not in POLICIES:
        names = ", ".join([*POLICIES, BeladyPolicy.name])
        raise ReplayConfigError(f"policy: expected a CachePolicy or one of {names}, found {policy!r}")
    return make_policy(policy, trace.num_layers, trace.num_experts)


# ---------------------------------------------------------------------------------- replay


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


def _per_output_token(values: np.ndarray, decode: np.ndarray) -> float:
    chosen = values[decode] if decode.any() else values
    return float(chosen.mean()) if len(chosen) else 0.0


def replay(
    trace: Trace,
    policy: str | CachePolicy,
    capacity_slots: int,
    profile: str | ReplayProfile = "pcie4",
    progress: bool = False,
) -> ReplayResult:
    """Feeds `trace` through a CacheController with `capacity_slots` device slots and `policy` (a
    name, "belady", or a fresh CachePolicy), over a virtual link of `profile` (a LINKS name for
    the trace's model, or a ReplayProfile). Sequences run one after another, batch 1."""
    if not isinstance(profile, ReplayProfile):
        profile = profile_for(trace, profile)
    L, E = trace.num_layers, trace.num_experts
    if (profile.model.num_layers, profile.model.num_experts) != (L, E):
        raise ReplayConfigError(
            f"profile model {profile.model.name}: expected the trace's (layers, experts) = {(L, E)}, "
            f"found {(profile.model.num_layers, profile.model.num_experts)}"
        )
    floor = max_active_experts(trace)
    if isinstance(capacity_slots, bool) or not isinstance(capacity_slots, (int, np.integer)) or capacity_slots < floor:
        raise ReplayConfigError(
            f"capacity: expected an integer number of slots >= {floor} (the most experts one layer needs "
            f"at once in this trace), found {capacity_slots!r}"
        )
    policy = build_policy(policy, trace)
    if (policy.num_layers, policy.num_experts) != (L, E):
        raise ReplayConfigError(
            f"policy {policy.name}: expected one built for (layers, experts) = {(L, E)}, "
            f"found {(policy.num_layers, policy.num_experts)}"
        )
    counters = TrafficCounters()
    link = VirtualLink(profile.link_bytes_per_s, profile.model.expert_bytes, counters)
    controller = CacheController(int(capacity_slots), E, policy, link, counters)
    use_lookahead = policy.wants_lookahead and trace.lookahead is not None
    step_s, step_compute_s, step_loads, step_decode = [], [], [], []
    for s in tqdm(
        range(trace.num_sequences), desc=f"replay {policy.name}", unit="seq", disable=not progress, leave=False
    ):
        policy.begin_batch()
        for step in trace_steps(trace, s, with_lookahead=use_lookahead):
            start, before = link.now, counters.snapshot()
            compute = 0.0
            for layer in range(L):
                dense_s, expert_s = profile.layer_s(step.tokens, step.active[layer])
                link.advance(dense_s)
                if use_lookahead and layer + 1 < L:
                    policy.lookahead(layer, step.lookahead[layer])
                controller.acquire(layer, step.counts[layer])
                link.advance(expert_s)
                controller.release()
                compute += dense_s + expert_s
            link.advance(profile.step_s())
            after = counters.snapshot()
            step_s.append(link.now - start)
            step_compute_s.append(compute + profile.step_s())
            step_loads.append(after["misses"] - before["misses"] + after["prefetches"] - before["prefetches"])
            step_decode.append(step.phase != PREFILL)
        policy.sequence_finished(trace.eam(s))
    c = counters.snapshot()
    accesses = int(c["hits"] + c["prefetch_hits"] + c["misses"])
    decode = np.array(step_decode, dtype=bool)
    steps = np.array(step_s, dtype=np.float64)
    return ReplayResult(
        policy=policy.name,
        capacity_slots=int(capacity_slots),
        link=profile.link,
        hit_rate=(c["hits"] + c["prefetch_hits"]) / accesses if accesses else 0.0,
        misses=int(c["misses"]),
        bytes=int(c["bytes_to_device"]),
        stall_s=float(c["stall_s"]),
        tpot_s=_per_output_token(steps, decode),
        total_s=link.now,
        accesses=accesses,
        late_prefetch_hits=int(c["prefetch_late"]),
        counters=c,
        step_s=steps,
        step_compute_s=np.array(step_compute_s, dtype=np.float64),
        step_loads=np.array(step_loads, dtype=np.int64),
        step_decode=decode,
    )


def lower_bound_tpot(belady: ReplayResult, profile: ReplayProfile) -> float:
    """Per decode step, the larger of its compute and the time to move the loads Belady needed
    there, averaged: no policy moves fewer experts than MIN, and no step computes faster than with
    every expert resident. (Per step, not whole-run: a prefetcher could in principle shift loads
    between steps, so the strict bound is max(total compute, total Belady bytes / bandwidth),
    which this is never below.)"""
    if belady.policy != BeladyPolicy.name:
        raise ReplayConfigError(f"lower bound: expected a Belady replay, found one of {belady.policy!r}")
    per_step = np.maximum(belady.step_compute_s, belady.step_loads * profile.load_s)
    return _per_output_token(per_step, belady.step_decode)
