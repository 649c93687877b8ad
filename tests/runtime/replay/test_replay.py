"""Trace replay: the virtual link, replay against hand-computed examples, Belady, the shared real
traces, and the synthetic workload generator of bench/synthetic.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from bench import synthetic
from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.cache.registry import LRUPolicy
from moeinf.runtime.replay.belady import BeladyPolicy, lower_bound_tpot
from moeinf.runtime.replay.cost import Gpu, ModelCost, ReplayProfile, profile_for
from moeinf.runtime.replay.link import VirtualLink
from moeinf.runtime.replay.loop import replay
from moeinf.runtime.traces import Trace, write_trace
from tests.paths import ROOT, SHARED_TRACES

needs_shared = pytest.mark.skipif(not SHARED_TRACES.exists(), reason="../shared/traces is absent")


def make_trace(routes, num_experts, phase=None, seq_starts=None, lookahead=None, model="toy"):
    """routes: [N][L][K] expert ids."""
    experts = np.array(routes, dtype=np.int16)
    N, L, K = experts.shape
    return Trace(
        experts=experts,
        weights=np.ones((N, L, K), np.float16),
        seq_starts=np.array(seq_starts if seq_starts is not None else [0, N], np.int64),
        phase=np.array(phase if phase is not None else [1] * N, np.int8),
        meta={"model": model, "num_layers": L, "num_experts": num_experts, "top_k": K, "source": "test"},
        lookahead=None if lookahead is None else np.array(lookahead, np.int16),
    )


def toy_profile(trace: Trace) -> ReplayProfile:
    """Round numbers: a load takes 1 s; per layer, attention 0.2 s and 0.1 s per active expert."""
    model = ModelCost(
        "toy",
        trace.num_layers,
        trace.num_experts,
        trace.top_k,
        expert_bytes=1,
        layer_dense_bytes=2,
        step_bytes=0,
        bytes_per_param=1,
    )
    return ReplayProfile("toy-link", 1.0, model, Gpu("toy", hbm_bytes_per_s=10.0, flops_per_s=1e30, layer_overhead_s=0))


# ---------------------------------------------------------------------------------- VirtualLink


def test_link_serves_urgent_before_prefetch_fifo_within_priority():
    counters = TrafficCounters()
    link = VirtualLink(link_bytes_per_s=2.0, expert_bytes=2, counters=counters)  # 1 s per load
    link.start_load((0, 0), 0, urgent=False)  # the idle link starts it at once: lands at 1
    link.start_load((0, 1), 1, urgent=False)  # queued prefetches...
    link.start_load((0, 2), 2, urgent=False)
    link.start_load((0, 3), 3, urgent=True)  # ...go after this on-demand load: 3 lands at 2
    link.start_load((0, 4), 4, urgent=True)  # FIFO among on-demand: lands at 3
    link.advance(2.5)
    assert link.finished() == [0, 3] and link.finished() == []
    link.wait(2)  # after 4 (3.0), then 1 (4.0), then 2 (5.0)
    assert link.now == 5.0 and link.stall_s == 2.5
    assert sorted(link.finished()) == [1, 4]
    assert link.bytes == 10 and counters.snapshot()["bytes_to_device"] == 10
    assert counters.snapshot()["stall_s"] == 2.5 and link.pending() == 0


def test_link_cancels_only_loads_not_started_and_promotes():
    link = VirtualLink(1.0, 1)
    link.start_load((0, 0), 0, urgent=False)  # on the link
    link.start_load((0, 1), 1, urgent=False)
    link.start_load((0, 2), 2, urgent=False)
    assert not link.try_cancel(0)  # running
    assert link.try_cancel(1)  # queued: dropped
    assert not link.try_cancel(1)
    link.start_load((1, 0), 1, urgent=False)  # the slot is reused
    link.promote((1, 0), 1)  # needed now: ahead of slot 2
    link.wait(1)
    assert link.now == 2.0 and link.promotions == 1  # 0 lands at 1, then the promoted load
    with pytest.raises(RuntimeError, match="wait\\(slot 5\\): expected a load"):
        link.wait(5)
    link.wait(2)
    assert link.now == 3.0 and link.bytes == 3
    with pytest.raises(RuntimeError, match="expected an idle slot"):
        link.start_load((2, 0), 0, urgent=True)  # slot 0 landed but was never reported


def test_link_clock_overlaps_loads_with_compute():
    link = VirtualLink(1.0, 1)
    link.start_load((0, 0), 0, urgent=True)  # lands at 1
    link.advance(0.4)
    link.wait(0)  # stalls 0.6
    link.advance(3.0)
    link.start_load((0, 1), 1, urgent=True)  # the idle link starts at now = 4, not when it freed up
    link.advance(0.5)
    assert link.finished() == []
    link.advance(0.5)
    assert link.finished() == [1]
    assert link.now == pytest.approx(5.0) and link.stall_s == pytest.approx(0.6)
    with pytest.raises(ReplayConfigError, match="positive bandwidth"):
        VirtualLink(0.0, 1)


# ---------------------------------------------------------------------------------- replay


def test_lru_replay_matches_hand_computed_example():
    # one layer, three experts, two slots; accesses a b c a b
    trace = make_trace([[[0]], [[1]], [[2]], [[0]], [[1]]], num_experts=3)
    profile = toy_profile(trace)
    r = replay(trace, "lru", 2, profile)
    # LRU evicts a for c, b for a, c for b: five misses. Each step: attention 0.2 s, a 1 s load
    # waited for in full, 0.1 s of expert compute.
    assert (r.hit_rate, r.misses, r.accesses, r.bytes) == (0.0, 5, 5, 5)
    assert r.stall_s == pytest.approx(5.0) and r.tpot_s == pytest.approx(1.3) and r.total_s == pytest.approx(6.5)
    assert r.counters["evictions"] == 3 and r.late_prefetch_hits == 0 and r.ready_hit_rate == r.hit_rate
    b = replay(trace, "belady", 2, profile)
    # MIN evicts b for c (b is used after a), so a hits: four misses
    assert (b.hit_rate, b.misses) == (0.2, 4)
    assert b.tpot_s == pytest.approx((4 * 1.3 + 0.3) / 5)
    # bound: per step max(compute 0.3, loads * 1 s)
    assert lower_bound_tpot(b, profile) == pytest.approx((4 * 1.0 + 0.3) / 5)
    with pytest.raises(ReplayConfigError, match="expected a Belady replay"):
        lower_bound_tpot(r, profile)


def test_two_layer_replay_pins_a_layers_experts():
    # accesses (layer, expert): (0,0) (1,1) | (0,0) (1,2) | (0,0) (1,1), two slots
    trace = make_trace([[[0], [1]], [[0], [2]], [[0], [1]]], num_experts=3)
    r = replay(trace, "lru", 2, toy_profile(trace))
    # (1,2) evicts (1,1), used longer ago than (0,0); then (1,1) evicts (1,2): hits are the (0,0)s
    assert (r.counters["hits"], r.misses) == (2, 4) and r.hit_rate == pytest.approx(1 / 3)
    # a miss costs 0.2 + 1 + 0.1; steps 2 and 3 hit layer 0 (0.3) and miss layer 1 (1.3)
    np.testing.assert_allclose(r.step_s, [2.6, 1.6, 1.6])
    np.testing.assert_allclose(r.step_compute_s, [0.6, 0.6, 0.6])
    np.testing.assert_array_equal(r.step_loads, [2, 1, 1])


class Recorder(LRUPolicy):
    """LRU that records the calls replay makes."""

    name = "recorder"
    wants_lookahead = True

    def __init__(self, num_layers, num_experts):
        super().__init__(num_layers, num_experts)
        self.calls = []

    def begin_batch(self):
        self.calls.append(("begin",))

    def lookahead(self, layer, next_counts):
        self.calls.append(("lookahead", layer, list(next_counts)))

    def observe(self, layer, token_counts):
        super().observe(layer, token_counts)
        self.calls.append(("observe", layer, list(token_counts)))

    def sequence_finished(self, eam):
        self.calls.append(("finished", eam.tolist()))


def test_replay_calls_the_policy_like_the_runtime():
    # sequence 0: two prefill tokens (one step) and a decode token; sequence 1: one decode token
    routes = [[[0], [1]], [[2], [1]], [[0], [0]], [[1], [2]]]
    lookahead = [[[1], [-1]], [[2], [-1]], [[0], [-1]], [[2], [-1]]]
    trace = make_trace(routes, 3, phase=[0, 0, 1, 1], seq_starts=[0, 3, 4], lookahead=lookahead)
    policy = Recorder(2, 3)
    r = replay(trace, policy, 4, toy_profile(trace))
    assert policy.calls == [
        ("begin",),
        ("lookahead", 0, [0, 1, 1]),  # the prefill step sums its tokens' lookahead
        ("observe", 0, [1, 0, 1]),
        ("observe", 1, [0, 2, 0]),  # no lookahead from the last layer
        ("lookahead", 0, [1, 0, 0]),
        ("observe", 0, [1, 0, 0]),
        ("observe", 1, [1, 0, 0]),
        ("finished", [[2, 0, 1], [1, 2, 0]]),
        ("begin",),
        ("lookahead", 0, [0, 0, 1]),
        ("observe", 0, [0, 1, 0]),
        ("observe", 1, [0, 0, 1]),
        ("finished", [[0, 1, 0], [0, 0, 1]]),
    ]
    np.testing.assert_array_equal(r.step_decode, [False, True, True])
    # TPOT is over decode steps only; the prefill step computes 2 active experts at layer 0
    assert r.tpot_s == pytest.approx(r.step_s[1:].mean())
    assert r.step_compute_s[0] == pytest.approx(0.2 + 0.2 + 0.2 + 0.1)


def test_replay_rejects_bad_setups():
    trace = make_trace([[[0, 1]], [[2, 3]]], num_experts=4, phase=[0, 0])
    profile = toy_profile(trace)
    with pytest.raises(ReplayConfigError, match=r"capacity: expected an integer number of slots >= 4 .* found 3"):
        replay(trace, "lru", 3, profile)  # the prefill step needs all four experts of the layer at once
    with pytest.raises(ReplayConfigError, match="found 2.5"):
        replay(trace, "lru", 2.5, profile)
    with pytest.raises(ReplayConfigError, match=r"policy lru: expected one built for \(layers, experts\) = \(1, 4\)"):
        replay(trace, LRUPolicy(2, 4), 4, profile)
    with pytest.raises(ReplayConfigError, match="expected a CachePolicy or one of lru, lfu.*belady, found 'nope'"):
        replay(trace, "nope", 4, profile)
    with pytest.raises(ReplayConfigError, match=r"trace model 'toy' with \(layers, experts, top_k\) = \(1, 4, 2\)"):
        replay(trace, "lru", 4, "pcie4")
    other = make_trace([[[0, 1]], [[2, 3]]], num_experts=4, phase=[1, 1])
    with pytest.raises(ReplayConfigError, match="belady: at access 1 expected"):
        replay(other, BeladyPolicy.from_trace(make_trace([[[0, 1]], [[1, 3]]], num_experts=4)), 2, profile)


def test_profiles_resolve_by_model_name_or_shape():
    mixtral = make_trace(np.zeros((1, 32, 2), int) + [0, 1], 8, model="mistralai/Mixtral-8x7B-Instruct-v0.1")
    p = profile_for(mixtral, "pcie4")
    assert p.model.expert_bytes == 3 * 4096 * 14336 * 2 and p.load_s == pytest.approx(352_321_536 / 25e9)
    assert profile_for(mixtral, "nvme").link_bytes_per_s == 7e9
    shaped = make_trace(np.zeros((1, 48, 8), int) + np.arange(8), 128, model="anything")
    assert profile_for(shaped, "pcie5").model.name == "qwen3-30b-a3b"
    with pytest.raises(ReplayConfigError, match="link profile: expected one of pcie4, pcie5, nvme, found 'pcie9'"):
        profile_for(mixtral, "pcie9")
    wrong = make_trace(np.zeros((1, 2, 2), int) + [0, 1], 8, model="Mixtral-8x7B")
    with pytest.raises(ReplayConfigError, match="expected mixtral-8x7b's shape"):
        profile_for(wrong)


def test_a_trace_with_its_own_costs_is_timed_by_them():
    """`moeinf trace` records its model's costs in meta["cost"]; they win over name and shape."""
    cost = dict(expert_bytes=25_000_000, layer_dense_bytes=10_000_000, step_bytes=50_000_000, bytes_per_param=2)
    own = make_trace(np.zeros((1, 32, 2), int) + [0, 1], 8, model="Mixtral-8x7B")
    own.meta["cost"] = cost
    profile = profile_for(own, "pcie4")
    assert profile.model.name == "Mixtral-8x7B" and profile.load_s == pytest.approx(1e-3)
    assert profile.model.layer_dense_bytes == 10_000_000 and profile.model.num_experts == 8
    own.meta["cost"] = dict(cost, step_bytes=0)
    with pytest.raises(ReplayConfigError, match="meta.cost.step_bytes: expected a positive number, found 0"):
        profile_for(own)
    own.meta["cost"] = {"expert_bytes": 1}
    with pytest.raises(ReplayConfigError, match="meta.cost: expected the keys expert_bytes, layer_dense_bytes"):
        profile_for(own)


def random_trace(rng, L, E, K, sequences, tokens):
    routes = [[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(sequences * tokens)]
    return make_trace(routes, E, seq_starts=np.arange(sequences + 1) * tokens)


def test_belady_never_loses_to_lru_or_lfu():
    rng = np.random.default_rng(0)
    for _ in range(25):
        L, E = int(rng.integers(1, 4)), int(rng.integers(2, 7))
        K = int(rng.integers(1, E + 1))
        trace = random_trace(rng, L, E, K, sequences=int(rng.integers(1, 4)), tokens=int(rng.integers(2, 12)))
        slots = int(rng.integers(K, L * E + 1))
        best = replay(trace, "belady", slots, toy_profile(trace))
        for name in ("lru", "lfu"):
            other = replay(trace, name, slots, toy_profile(trace))
            assert best.misses <= other.misses and best.hit_rate >= other.hit_rate
            assert best.tpot_s <= other.tpot_s + 1e-9


def test_belady_matches_hand_computed_min():
    # one layer, 4 experts, 3 slots: a b c d a b e a b c d e (Belady's textbook example reshaped):
    # MIN keeps a and b throughout and misses a b c d e c d = 7 times
    seq = [0, 1, 2, 3, 0, 1, 4, 0, 1, 2, 3, 4]
    trace = make_trace([[[e]] for e in seq], num_experts=5)
    best = replay(trace, "belady", 3, toy_profile(trace))
    assert best.misses == 7 and best.hit_rate == pytest.approx(5 / 12)
    assert replay(trace, "lru", 3, toy_profile(trace)).misses == 10


@needs_shared
def test_shared_gsm8k_trace_at_64_slots():
    from moeinf.runtime.traces import read_trace

    trace = read_trace(SHARED_TRACES / "mixtral-8x7b-gsm8k.npz")
    lru = replay(trace, "lru", 64)
    best = replay(trace, "belady", 64)
    # README: LRU about 31%, Belady about 59%. The controller pins a layer's hits before claiming
    # slots for its misses, which LRU gets 34.3% with; a per-access LRU that may evict a key the
    # same layer still needs gets 28.6%.
    assert 0.28 <= lru.hit_rate <= 0.36
    assert best.hit_rate == pytest.approx(0.59, abs=0.015)
    assert best.tpot_s < lru.tpot_s


# ---------------------------------------------------------------------------------- bench scripts


@needs_shared
def test_synthetic_workload_is_reproducible_and_matches_its_targets():
    w = synthetic.Workload(model="mixtral-8x7b", sequences=48, min_tokens=40, max_tokens=60, seed=3)
    a, b = synthetic.generate(w), synthetic.generate(w)
    for name in ("experts", "weights", "seq_starts", "phase", "lookahead"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.experts, synthetic.generate(dataclasses.replace(w, seed=4)).experts)
    # in-sequence reuse: the real traces' token-to-token repeat rate (0.357 on average)
    assert synthetic.repeat_rate(a) == pytest.approx(0.357, abs=0.02)
    # lookahead accuracy: the share of next-layer experts predicted right
    hits = (a.lookahead[:, :-1, :, None] == a.experts[:, 1:, None, :]).any(-1).mean()
    assert hits == pytest.approx(w.lookahead_accuracy, abs=0.03)


@needs_shared
def test_synthetic_task_skew_matches_the_domain_counts():
    w = synthetic.Workload(
        model="qwen3-30b-a3b", sequences=96, min_tokens=32, max_tokens=32, tasks=("arxiv",), lookahead_accuracy=None
    )
    trace = synthetic.generate(w)
    target = synthetic.domain_targets(128)["arxiv"]
    skew = synthetic.task_skew(trace)["arxiv"]
    measured_layers = np.rint(target.depths * (trace.num_layers - 1)).astype(int)
    entropy = np.array(skew["entropy"])[measured_layers]
    np.testing.assert_allclose(entropy, target.entropy, atol=0.012)


def test_policy_bench_prints_the_json_it_promises(tmp_path):
    rng = np.random.default_rng(1)
    trace = random_trace(rng, 32, 8, 2, sequences=2, tokens=3)
    trace.meta["model"] = "Mixtral-8x7B (random routing)"
    write_trace(tmp_path / "t.npz", trace)
    out = subprocess.run(
        [sys.executable, "-m", "bench.policy", "--trace", str(tmp_path / "t.npz"), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(out.stdout)
    assert set(figures) == {"policies", "bound"} and set(figures["bound"]) == {"tpot_s"}
    assert {"lru", "lfu", "belady"} <= set(figures["policies"])
    for summary in figures["policies"].values():
        assert set(summary) == {"hit_rate", "misses", "bytes", "stall_s", "tpot_s"}
    assert figures["bound"]["tpot_s"] <= figures["policies"]["belady"]["tpot_s"]
