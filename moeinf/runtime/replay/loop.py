"""Trace replay: the runtime's cache controller and policies, driven by a recorded trace over a
virtual clock instead of a model over real copies.

Why: policies are compared on hit rate, bytes moved and time per output token, at scales (a 671B
model, thousands of sequences) and link speeds (PCIe 4/5, NVMe) no test machine has. DESIGN.md's
invariant "policy is pure; mechanism touches memory" makes this exact: replay drives the very
CacheController the runtime's expert pool drives, through the same entry points (begin_batch,
acquire, release, sequence_finished), with the same CachePolicy objects; only the LoadMechanism
differs (a VirtualLink here, the ExpertPool there). The clock is virtual, so results are
deterministic and independent of the machine replaying them.

The timing model, per decode step (one token of batch 1) and per layer l:
  1. attention + router on resident dense weights: `dense_s` of virtual time passes, while the
     link keeps serving queued loads;
  2. controller.acquire(l, counts, lookahead counts when the policy wants them and the trace has
     them): hits pin, misses go to the link at on-demand priority, the policy's prefetches are
     queued behind them; the clock waits (stall) until every needed expert has landed;
  3. the experts run: the device's share (those in slots) for `device_experts_s`, and, with a
     Placement, the host's share (the misses it placed there, HOST in the slot table) for the sum
     of their `host_expert_s` plus the host's per-layer overhead, started when acquire was called
     (the host work is issued before the device waits for its loads); the layer ends when both
     are done; controller.release(). Promotions the controller issued ride the link meanwhile.
After the last layer the per-step remainder (lm head, dense FFN layers outside the trace) passes.
A sequence's prefill tokens, if any, form one step whose counts sum theirs. The link serves one
load at a time (a single copy engine / one NVMe queue saturates the link), on-demand before
prefetch, FIFO within a priority, without preemption; a prefetch that has not started can be
cancelled. The costs are cost.py's; Belady's bound is belady.py's.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache.controller import CacheController
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.cache.eam import PREFILL
from moeinf.runtime.cache.placement import HOST, Placement
from moeinf.runtime.cache.registry import POLICIES, CachePolicy, make_policy
from moeinf.runtime.replay.belady import BeladyPolicy
from moeinf.runtime.replay.cost import ReplayProfile, profile_for
from moeinf.runtime.replay.link import VirtualLink
from moeinf.runtime.replay.result import ReplayResult, per_output_token
from moeinf.runtime.replay.steps import max_active_experts, trace_steps
from moeinf.runtime.traces import Trace


def build_policy(policy: str | CachePolicy, trace: Trace) -> CachePolicy:
    """A policy for replaying `trace`: a CachePolicy as is, "belady", or a name in POLICIES."""
    if policy == BeladyPolicy.name:
        return BeladyPolicy.from_trace(trace)
    if not isinstance(policy, CachePolicy) and policy not in POLICIES:
        names = ", ".join([*POLICIES, BeladyPolicy.name])
        raise ReplayConfigError(f"policy: expected a CachePolicy or one of {names}, found {policy!r}")
    return make_policy(policy, trace.num_layers, trace.num_experts)


def shares_s(profile: ReplayProfile, counts, table: list[int]) -> tuple[float, float]:
    """(device_s, host_s) of one layer: counts [E] tokens per expert; table [E] from acquire."""
    device_pairs = device_active = 0
    host_s = 0.0
    for expert, slot in enumerate(table):
        if slot >= 0:
            device_pairs += int(counts[expert])
            device_active += 1
        elif slot == HOST:
            host_s += profile.host_expert_s(int(counts[expert]))
    if host_s:
        host_s += profile.host.layer_overhead_s
    return profile.device_experts_s(device_pairs, device_active), host_s


def replay(
    trace: Trace,
    policy: str | CachePolicy,
    capacity_slots: int,
    profile: str | ReplayProfile = "pcie4",
    progress: bool = False,
    placement: Placement | None = None,
) -> ReplayResult:
    """Feeds `trace` through a CacheController with `capacity_slots` device slots and `policy` (a
    name, "belady", or a fresh CachePolicy), over a virtual link of `profile` (a LINKS name for
    the trace's model, or a ReplayProfile), misses placed by `placement` (None: all fetched; any
    other needs a profile with a host). Sequences run one after another, batch 1."""
    if not isinstance(profile, ReplayProfile):
        profile = profile_for(trace, profile)
    if placement is not None and profile.host is None:
        raise ReplayConfigError(f"placement {placement!r}: expected a profile with a host to compute on, found none")
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
    controller = CacheController(int(capacity_slots), E, policy, link, counters, placement)
    use_lookahead = controller.wants_lookahead and trace.lookahead is not None
    step_s, step_compute_s, step_loads, step_decode = [], [], [], []
    for s in tqdm(
        range(trace.num_sequences), desc=f"replay {policy.name}", unit="seq", disable=not progress, leave=False
    ):
        controller.begin_batch()
        for step in trace_steps(trace, s, with_lookahead=use_lookahead):
            start, before = link.now, counters.snapshot()
            compute = 0.0
            for layer in range(L):
                dense_s, _ = profile.layer_s(step.tokens, step.active[layer])
                link.advance(dense_s)
                guess = step.lookahead[layer] if use_lookahead and layer + 1 < L else None
                issued = link.now
                counts = step.counts[layer]
                table = controller.acquire(layer, counts, guess)
                device_s, host_s = shares_s(profile, counts, table)
                counters.add(host_s=host_s)
                link.advance(max(link.now + device_s, issued + host_s) - link.now)
                controller.release()
                compute += dense_s + max(device_s, host_s)
            link.advance(profile.step_s())
            after = counters.snapshot()
            step_s.append(link.now - start)
            step_compute_s.append(compute + profile.step_s())
            step_loads.append(after["misses"] - before["misses"] + after["prefetches"] - before["prefetches"])
            step_decode.append(step.phase != PREFILL)
        controller.sequence_finished(trace.eam(s))
    c = counters.snapshot()
    accesses = int(c["hits"] + c["prefetch_hits"] + c["misses"] + c["host_computed"])
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
        tpot_s=per_output_token(steps, decode),
        total_s=link.now,
        accesses=accesses,
        late_prefetch_hits=int(c["prefetch_late"]),
        counters=c,
        step_s=steps,
        step_compute_s=np.array(step_compute_s, dtype=np.float64),
        step_loads=np.array(step_loads, dtype=np.int64),
        step_decode=decode,
    )
