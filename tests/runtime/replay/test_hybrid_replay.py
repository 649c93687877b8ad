"""Hybrid placement in replay: misses computed on the host lane, promotions over the idle link, the
peers' placements, and the costs Placement("auto") decides by; hand-computed on toy profiles."""

from __future__ import annotations

import dataclasses

import pytest

from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache.placement import HOST, ExpertCosts, Placement
from moeinf.runtime.replay.cost import Host, profile_for
from moeinf.runtime.replay.loop import replay
from tests.paths import SHARED_TRACES
from tests.runtime.replay.test_replay import make_trace, toy_profile

needs_shared = pytest.mark.skipif(not SHARED_TRACES.exists(), reason="../shared/traces is absent")
# a load takes 1 s; per layer attention 0.2 s and 0.1 s per active device expert (toy_profile);
# the host computes an expert in 0.4 s, plus 0.05 s a layer it works in
TOY_HOST = Host("toy-host", bytes_per_s=2.5, flops_per_s=1e30, layer_overhead_s=0.05)


def hybrid(trace):
    return dataclasses.replace(toy_profile(trace), host=TOY_HOST)


def test_host_only_computes_every_expert_on_the_host_and_moves_nothing():
    trace = make_trace([[[0]], [[1]], [[0]]], num_experts=3)
    r = replay(trace, "lru", 2, hybrid(trace), placement=Placement("always", promote=False))
    # each step: attention 0.2 s, then the host's 0.4 + 0.05 s; no load, no stall
    assert r.tpot_s == pytest.approx(0.65) and r.bytes == 0 and r.stall_s == 0
    assert (r.counters["host_computed"], r.misses, r.accesses, r.hit_rate) == (3, 0, 3, 0.0)
    assert r.counters["host_s"] == pytest.approx(3 * 0.45)


def test_a_promotion_rides_the_idle_link_and_later_steps_hit_it():
    # one expert, used by four steps in a row: step 1 computes it on the host and promotes it
    # (1 s on the link); step 2 starts at 0.65 s while the load is still on the link, so the host
    # computes it again; the load lands at 1.2 s, during step 2; steps 3 and 4 hit it on the device
    trace = make_trace([[[0]], [[0]], [[0]], [[0]]], num_experts=2)
    r = replay(trace, "lru", 1, hybrid(trace), placement=Placement("always"))
    assert (r.counters["promotions"], r.counters["promotion_hits"], r.counters["host_computed"]) == (1, 1, 2)
    assert r.counters["hits"] == 2 and r.hit_rate == pytest.approx(0.5) and r.bytes == 1
    assert list(r.step_s) == pytest.approx([0.65, 0.65, 0.3, 0.3])


def test_static_split_keeps_the_first_layers_on_the_device_and_the_rest_on_the_host():
    # two layers of two experts, two slots: layer 0 on the device (fetched on first use), layer 1 on the host
    trace = make_trace([[[0], [1]], [[1], [0]], [[0], [1]]], num_experts=2)
    r = replay(trace, "lru", 2, hybrid(trace), placement=Placement("always", promote=False, device_layers=1))
    assert (r.misses, r.counters["hits"], r.counters["host_computed"]) == (2, 1, 3)
    # step 1: layer 0 misses (0.2 + 1 + 0.1), layer 1 on the host (0.2 + 0.45); step 2 the same with
    # expert 1 in layer 0; step 3 hits layer 0
    assert list(r.step_s) == pytest.approx([1.95, 1.95, 0.95])


def test_auto_fetches_where_the_device_wins_and_computes_on_the_host_where_it_does():
    costs = ExpertCosts(
        expert_bytes=1000, flops_per_token=100, link_bytes_per_s=1000, host_bytes_per_s=4000, host_flops_per_s=1000,
        device_bytes_per_s=1e6, device_flops_per_s=1e6,
    )  # fmt: skip
    auto = Placement("auto", costs)
    # host: max(0.25 s, tokens * 0.1 s); fetch: 1 s + ~0.001 s
    assert auto.on_host(0, 1) and auto.on_host(0, 10)
    assert not auto.on_host(0, 11)  # prefill-sized: the device's FLOPs win
    assert not Placement("never").on_host(0, 1) and Placement("always").on_host(0, 1000)


def test_placements_reject_what_they_cannot_decide():
    with pytest.raises(ValueError, match="host_compute: expected one of auto, never, always, found 'sometimes'"):
        Placement("sometimes")
    with pytest.raises(ValueError, match="expected the expert costs"):
        Placement("auto")
    trace = make_trace([[[0]]], num_experts=2)
    with pytest.raises(ReplayConfigError, match="expected a profile with a host"):
        replay(trace, "lru", 1, toy_profile(trace), placement=Placement("always"))
    with pytest.raises(ReplayConfigError, match="host profile: expected one of ddr4, ddr5"):
        profile_for(make_trace([[[0, 1]]] * 1, num_experts=8, model="mixtral-8x7b"), host="ddr9")


def test_the_slot_table_marks_host_experts():
    from moeinf.runtime.cache.controller import CacheController
    from moeinf.runtime.cache.counters import TrafficCounters
    from moeinf.runtime.cache.registry import LRUPolicy
    from moeinf.runtime.replay.link import VirtualLink

    counters = TrafficCounters()
    link = VirtualLink(1.0, 1, counters)
    controller = CacheController(2, 4, LRUPolicy(1, 4), link, counters, Placement("always", promote=False))
    assert controller.acquire(0, [1, 0, 2, 0]) == [HOST, -1, HOST, -1]
    controller.release()


@needs_shared
def test_on_the_mixtral_trace_the_default_placement_beats_fetching_and_the_peers():
    from moeinf.runtime.traces import read_trace

    trace = read_trace(SHARED_TRACES / "mixtral-8x7b-gsm8k.npz")
    profile = profile_for(trace, "pcie4", host="ddr4")
    slots = 64  # 25% of 32 x 8
    fetch_lru = replay(trace, "lru", slots, profile).tpot_s
    lru_host = replay(trace, "lru", slots, profile, placement=Placement("always")).tpot_s
    auto = Placement("auto", profile.expert_costs())
    default = replay(trace, "activation-aware", slots, profile, placement=auto).tpot_s
    assert default <= 0.4 * fetch_lru and default < lru_host


def test_policy_bench_with_a_host_adds_the_placements_and_names_the_default(tmp_path):
    import json
    import subprocess
    import sys

    import numpy as np

    from moeinf.runtime.traces import write_trace
    from tests.paths import ROOT
    from tests.runtime.replay.test_replay import random_trace

    trace = random_trace(np.random.default_rng(2), 32, 8, 2, sequences=2, tokens=3)
    trace.meta["model"] = "Mixtral-8x7B (random routing)"
    write_trace(tmp_path / "t.npz", trace)
    command = [sys.executable, "-m", "bench.policy", "--trace", str(tmp_path / "t.npz"), "--host", "ddr4", "--json"]
    figures = json.loads(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert set(figures) == {"policies", "bound", "default"} and figures["default"] == "activation-aware+host"
    peers = {"host-only", "static-split", "lru+host", "activation-aware+host"}
    assert {"lru", "belady", *peers} <= set(figures["policies"])
    for summary in figures["policies"].values():
        assert set(summary) == {"hit_rate", "misses", "bytes", "stall_s", "tpot_s"}
    host_only = figures["policies"]["host-only"]
    assert host_only["bytes"] == 0 and host_only["misses"] == 0


def test_auto_in_replay_fetches_for_a_prefill_step_and_computes_decode_misses_on_the_host():
    # one layer; a 20-token prefill routes all of them to expert 0, then one decode token routes to
    # expert 1. With the host at 0.4 s + 0.1 s a token and the device at 0.1 s, the prefill's 20
    # tokens are cheaper fetched (1 + 0.1 s) than computed on the host (2 s); the decode token's not
    trace = make_trace([[[0]]] * 20 + [[[1]]], num_experts=2, phase=[0] * 20 + [1])
    profile = dataclasses.replace(
        toy_profile(trace), host=Host("slow-flops", 2.5, flops_per_s=20.0, layer_overhead_s=0)
    )
    r = replay(trace, "lru", 2, profile, placement=Placement("auto", profile.expert_costs()))
    assert (r.misses, r.counters["host_computed"]) == (1, 1)
