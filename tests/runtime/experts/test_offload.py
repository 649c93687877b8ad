"""Offloading is exact at every budget and policy, and its counters reflect real transfers."""

import threading

import numpy as np
import pytest
import torch

from moeinf import LLM, SamplingParams
from moeinf.errors import LLMClosedError, OffloadConfigError, StoreChecksumError
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_store import ExpertStore, aligned_buffer
from moeinf.runtime.cache.controller import CacheController, PolicyError
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.cache.registry import LFUPolicy, LRUPolicy
from moeinf.runtime.experts.transfer import TransferQueue
from moeinf.runtime.setup import OffloadConfig, parse_budget
from tests.checkpoints import save_tiny_mixtral
from tests.runtime.cache.keyed import victim

L, E = 4, 8  # the test checkpoint: 32 experts, minimum budget one layer = 8 slots
PROMPTS = [[5, 9, 13, 2, 7], list(range(3, 40)), [17]]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


class NextLayerPrefetch(LRUPolicy):
    """Prefetches every expert of the next layer: exercises the prefetch path (hits, waste,
    cancellation, promotion) without the activation-aware predictor."""

    name = "next-layer-test"

    def prefetch(self, layer):
        return [(layer + 1, e) for e in range(self.num_experts)] if layer + 1 < self.num_layers else []


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    save_tiny_mixtral(folder, seed=5, num_local_experts=E, num_hidden_layers=L)
    return folder


@pytest.fixture(scope="module")
def resident(folder):
    llm = LLM(folder, progress=False)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)], llm.logits(PROMPTS[1])


@pytest.mark.parametrize("budget", [E, 11, 0.5, "75%", L * E - 1])
@pytest.mark.parametrize("policy", ["lru", "lfu", "prefetch", "activation-aware", "activation-aware+lookahead"])
def test_offloaded_run_equals_resident_run(folder, resident, tmp_path, budget, policy):
    tokens, logits = resident
    chosen = NextLayerPrefetch(L, E) if policy == "prefetch" else policy
    with LLM(folder, progress=False, expert_budget=budget, policy=chosen, offload_dir=tmp_path) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == tokens
        assert torch.equal(llm.logits(PROMPTS[1]), logits)
    stats = llm.stats()  # after close: every load that started has landed and been counted
    assert stats["misses"] > 0 and stats["resident_experts"] <= parse_budget(budget, 1, L * E)
    record = llm.experts.layout.record_nbytes
    assert stats["bytes_from_disk"] % record == 0 and stats["bytes_from_disk"] >= stats["misses"] * record
    assert stats["bytes_to_device"] == stats["bytes_from_disk"] // record * llm.experts.layout.payload_nbytes
    if policy in ("activation-aware", "activation-aware+lookahead") and budget == E:
        # one layer's experts: every victim a prefetch could take served the last step, so the
        # working-set guard declines them all (and the run stays exact without them)
        assert stats["prefetches"] == 0 and stats["prefetch_declined"] > 0
    elif policy != "lru" and policy != "lfu":
        assert stats["prefetch_hits"] > 0


def test_host_tier_serves_repeat_loads(folder, resident, tmp_path):
    # on-demand loads only (lru, every miss fetched), so every load has landed when the counters are read
    settings = dict(expert_budget=E, host_budget=1.0, policy="lru", host_compute="never", offload_dir=tmp_path)
    with LLM(folder, progress=False, **settings) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == resident[0]
        stats = llm.stats()
    # every expert is read from disk at most once; later loads come from host memory
    assert stats["bytes_from_disk"] <= L * E * llm.experts.layout.record_nbytes
    assert stats["host_hits"] > 0
    assert stats["host_hits"] + stats["bytes_from_disk"] // llm.experts.layout.record_nbytes == stats["misses"]


def test_offload_config_object_equals_keywords(folder, resident, tmp_path):
    config = OffloadConfig(expert_budget=0.5, policy="lfu", offload_dir=str(tmp_path))
    with LLM(folder, progress=False, offload=config) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == resident[0]
    with pytest.raises(OffloadConfigError, match="either as keywords or"):
        LLM(folder, progress=False, offload=config, expert_budget=0.25)


def test_full_budget_keeps_every_expert_resident_without_a_store(folder, tmp_path):
    llm = LLM(folder, progress=False, expert_budget=1.0, offload_dir=tmp_path / "store")
    llm.generate(PROMPTS, PARAMS)
    stats = llm.stats()
    assert stats["resident_experts"] == L * E and stats["misses"] == 0 and stats["hits"] > 0
    assert not (tmp_path / "store").exists()


def test_resident_hits_count_every_expert_access_of_the_offloaded_run(folder, tmp_path):
    """Resident runs count hits on the device (no host read per layer); the same routing offloaded
    needs each of those (layer, expert) accesses as a hit, a miss or a prefetch hit."""
    with LLM(folder, progress=False) as resident:
        resident.generate(PROMPTS, PARAMS)
        hits = resident.stats()["hits"]
    with LLM(folder, progress=False, expert_budget=L * E - 1, offload_dir=tmp_path) as offloaded:
        offloaded.generate(PROMPTS, PARAMS)
        stats = offloaded.stats()
    assert hits == stats["hits"] + stats["misses"] + stats["prefetch_hits"] > 0


def test_budget_below_one_layer_names_the_minimum(folder, tmp_path):
    with pytest.raises(OffloadConfigError, match=r"affords 7 expert slots; the minimum is 8"):
        LLM(folder, progress=False, expert_budget=E - 1, offload_dir=tmp_path)
    with pytest.raises(OffloadConfigError, match="the minimum is 8"):
        LLM(folder, progress=False, expert_budget="1KiB", offload_dir=tmp_path)


def test_corrupted_record_is_caught_and_reread_from_the_checkpoint(folder, resident, tmp_path):
    with LLM(folder, progress=False, expert_budget=E, offload_dir=tmp_path) as llm:
        store = llm.experts.store
        path, offset = store.path, store.data_offset + (1 * store.num_experts + 3) * store.layout.record_nbytes
    with open(path, "r+b") as f:  # flip bytes in the middle of expert (1, 3)'s record
        f.seek(offset + 100)
        f.write(b"\xff" * 64)
    with LLM(folder, progress=False, expert_budget=E, offload_dir=tmp_path) as llm:
        assert not llm.experts.store.built  # the header still matches: the damage is in a record
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == resident[0]
        assert llm.stats()["checksum_failures"] > 0


def corrupt_record(path, store, layer, expert):
    """Flips 64 bytes in the middle of record (layer, expert)'s payload."""
    offset = store.data_offset + (layer * store.num_experts + expert) * store.layout.record_nbytes
    with open(path, "r+b") as f:
        f.seek(offset + store.layout.payload_nbytes // 2)
        f.write(b"\xff" * 64)


def corrupt_records(store):
    """The (layer, expert) pairs whose record fails its checksum, read through a fresh handle."""
    buffer = aligned_buffer(store.layout.record_nbytes)
    bad = []
    for layer in range(store.num_layers):
        for expert in range(store.num_experts):
            try:
                store.read_into(layer, expert, buffer)
            except StoreChecksumError:
                bad.append((layer, expert))
    return bad


@pytest.mark.parametrize("host_budget", [0, 1.0])  # read into a slot, or into the host tier
def test_a_corrupted_record_is_repaired_in_place_once_rebuilt(folder, resident, tmp_path, host_budget):
    settings = dict(expert_budget=E, host_budget=host_budget, offload_dir=tmp_path)
    with LLM(folder, progress=False, **settings) as llm:
        path, store = llm.experts.store.path, llm.experts.store
    for layer in range(L):
        corrupt_record(path, store, layer, 3)  # expert 3 of every layer
    with ExpertStore.open_or_build(Checkpoint.open(folder), tmp_path, torch.float32, progress=False) as check:
        assert corrupt_records(check) == [(layer, 3) for layer in range(L)]
    with LLM(folder, progress=False, **settings) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == resident[0]
        first = llm.stats()
    assert first["checksum_failures"] == first["records_repaired"] >= L  # each damaged record was read
    with ExpertStore.open_or_build(Checkpoint.open(folder), tmp_path, torch.float32, progress=False) as check:
        assert not check.built and corrupt_records(check) == []  # rewritten in place: the file verifies clean
    with LLM(folder, progress=False, **settings) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == resident[0]
        second = llm.stats()
    assert second["checksum_failures"] == second["records_repaired"] == 0  # nothing read from the checkpoint


@pytest.mark.parametrize("budget", [None, 0.5])
def test_a_closed_llm_refuses_every_use_by_name(folder, tmp_path, budget):
    llm = LLM(folder, progress=False, expert_budget=budget, offload_dir=tmp_path)
    llm.generate([PROMPTS[0]], PARAMS)
    llm.close()
    llm.close()  # twice is fine
    expected = r"expected an open LLM, found one closed by close\(\)"
    with pytest.raises(LLMClosedError, match=expected):
        llm.generate([PROMPTS[0]], PARAMS)
    with pytest.raises(LLMClosedError, match=expected):
        llm.logits(PROMPTS[0])
    with pytest.raises(LLMClosedError, match=expected):
        llm.submit(PROMPTS[0], PARAMS)
    with pytest.raises(LLMClosedError, match=expected):
        llm.submit(PROMPTS[0], PARAMS)  # the loop a submit after close started is closed too
    llm.close()
    assert llm.stats()["prefill_tokens"] == len(PROMPTS[0])  # what it did stays readable


def test_closing_an_llm_with_a_running_engine_loop_then_using_it(folder, tmp_path):
    with LLM(folder, progress=False, expert_budget=0.5, offload_dir=tmp_path) as llm:
        handle = llm.submit(PROMPTS[0], PARAMS)
    assert len(handle.result(timeout=30).token_ids) == PARAMS.max_new_tokens  # close() let it finish
    with pytest.raises(LLMClosedError):
        llm.submit(PROMPTS[0], PARAMS)


def test_changed_checkpoint_rebuilds_the_store(tmp_path):
    folder, store = tmp_path / "model", tmp_path / "store"
    save_tiny_mixtral(folder, seed=1, num_local_experts=E, num_hidden_layers=L)
    with LLM(folder, progress=False, expert_budget=E, offload_dir=store) as llm:
        assert llm.experts.store.built
        first = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    save_tiny_mixtral(folder, seed=2, num_local_experts=E, num_hidden_layers=L)  # new weights, same place
    expected = [o.token_ids for o in LLM(folder, progress=False).generate(PROMPTS, PARAMS)]
    with LLM(folder, progress=False, expert_budget=E, offload_dir=store) as llm:
        assert llm.experts.store.built
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == expected != first
    with LLM(folder, progress=False, expert_budget=E, offload_dir=store) as llm:
        assert not llm.experts.store.built  # unchanged now: reused


def test_a_prefetched_expert_is_read_once_when_it_is_needed_in_flight(folder, tmp_path, monkeypatch):
    with LLM(folder, progress=False, expert_budget=2 * E, policy=NextLayerPrefetch(L, E), offload_dir=tmp_path) as llm:
        reads = []
        original = llm.experts.store.read_into

        def counting_read(layer, expert, out):
            reads.append((layer, expert))
            original(layer, expert, out)

        monkeypatch.setattr(llm.experts.store, "read_into", counting_read)
        llm.generate(PROMPTS, PARAMS)
        stats = llm.stats()
    assert stats["prefetch_hits"] > 0
    # one read per load: a needed expert whose prefetch is in flight waits for it, never reads again
    assert len(reads) == stats["misses"] + stats["prefetches"] - stats["prefetch_cancelled"]


def test_queue_runs_urgent_loads_first_and_cancels_queued_prefetches():
    gate, order = threading.Event(), []

    def load(key, slot):
        if key == "block":
            gate.wait(5)
        order.append(key)

    queue = TransferQueue(load, workers=1)
    blocker = queue.submit("block", 0, urgent=True)  # occupies the only worker
    stale = queue.submit("stale", 1, urgent=False)
    late = queue.submit("prefetch", 2, urgent=False)
    urgent = queue.submit("urgent", 3, urgent=True)
    assert queue.cancel(stale)
    queue.promote(late, "prefetch", 2)  # becomes needed: runs right after the urgent load
    gate.set()
    for ticket in (blocker, late, urgent):
        ticket.result(timeout=5)
    queue.close()
    assert order == ["block", "urgent", "prefetch"]  # the stale prefetch never ran, the promoted one ran once
    assert not queue.cancel(urgent)  # a finished load cannot be cancelled


def test_policies_choose_their_victims():
    lru, lfu = LRUPolicy(2, 4), LFUPolicy(2, 4)
    for policy in (lru, lfu):
        policy.observe(0, [5, 0, 0, 1])  # expert 0 busy, expert 3 light
        policy.observe(1, [0, 1, 0, 0])
        policy.observe(0, [0, 0, 0, 1])  # expert 3 used most recently
    candidates = [(0, 0), (0, 3), (1, 1)]
    assert victim(lru, candidates) == (0, 0)  # oldest use
    assert victim(lfu, candidates) == (1, 1)  # fewest tokens (1), older than (0, 3)'s 2


class InstantLoads:
    """A LoadMechanism whose loads land as soon as they are started."""

    def __init__(self):
        self.landed = []

    def start_load(self, key, slot, urgent):
        self.landed.append(slot)

    def promote(self, key, slot):
        pass

    def try_cancel(self, slot):
        return False

    def wait(self, slot):
        pass

    def finished(self):
        landed, self.landed = self.landed, []
        return landed


class PinnedVictim(LRUPolicy):
    """Answers with the slot the layer computing now has pinned: outside the contract."""

    name = "pinned-victim-test"

    def victim_slot(self, layer_of, expert_of, evictable):
        return int(np.flatnonzero(~evictable & (layer_of >= 0))[0])


def test_controller_evicts_the_policys_victim_slot_and_names_a_bad_one():
    controller = CacheController(2, 4, LRUPolicy(3, 4), InstantLoads(), TrafficCounters())
    for layer in range(2):
        controller.acquire(layer, [1 if e == layer else 0 for e in range(4)])
        controller.release()
    controller.acquire(2, [0, 0, 1, 0])  # the pool is full: layer 0's expert, used longest ago, goes
    res = controller.residency
    assert res.slot((0, 0)) is None and res.slot((1, 1)) is not None and res.slot((2, 2)) is not None
    assert res.evictable_count == 1  # (1, 1); (2, 2) is pinned until release
    controller.release()
    assert res.evictable_count == 2

    bad = CacheController(2, 4, PinnedVictim(3, 4), InstantLoads(), TrafficCounters())
    bad.acquire(0, [1, 0, 0, 0])
    bad.release()
    bad.acquire(1, [0, 1, 0, 0])
    bad.release()
    with pytest.raises(PolicyError, match="policy pinned-victim-test: expected the slot of an evictable expert"):
        bad.acquire(1, [0, 1, 1, 0])  # (1, 1) is resident and pinned; (1, 2) needs a victim


class PrefetchWithoutEvicting(NextLayerPrefetch):
    """Prefetches the next layer's experts into free slots only."""

    name = "prefetch-without-evicting-test"

    def prefetch_victim_slot(self, layer_of, expert_of, evictable):
        return -1


def test_a_prefetch_the_policy_will_not_evict_for_is_declined_and_evicts_nothing():
    counters = TrafficCounters()
    controller = CacheController(3, 4, PrefetchWithoutEvicting(3, 4), InstantLoads(), counters)
    controller.acquire(0, [1, 0, 0, 0])  # one slot used; the next layer's four experts ask for two free ones
    res = controller.residency
    assert {key for key in res.slot_of} == {(0, 0), (1, 0), (1, 1)}
    stats = counters.snapshot()
    assert stats["prefetches"] == 2 and stats["prefetch_declined"] == 2 and stats["evictions"] == 0
    controller.release()
    controller.acquire(1, [0, 0, 1, 0])  # a miss still evicts: LRU's victim, (1, 0), never used
    assert res.slot((1, 0)) is None and res.slot((1, 2)) is not None
    stats = counters.snapshot()
    assert stats["evictions"] == 1 and stats["prefetch_wasted"] == 1
    assert stats["prefetches"] == 2 and stats["prefetch_declined"] == 2 + 4  # no free slot for layer 2's


@pytest.mark.parametrize(
    "value, slots",
    [(None, 32), (0.25, 8), (1.0, 32), ("50%", 16), (10, 10), (100, 32), ("2KiB", 2), ("3000", 3), ("1.5kb", 1)],
)
def test_budget_parsing(value, slots):
    assert parse_budget(value, expert_nbytes=1000, total_experts=32) == slots


@pytest.mark.parametrize("value", [-1, 1.5, "lots", "2 parsecs", True, [4]])
def test_bad_budgets_are_named_errors(value):
    with pytest.raises(OffloadConfigError, match="expert_budget: expected"):
        parse_budget(value, expert_nbytes=1000, total_experts=32)


def test_unknown_policy_is_a_named_error(folder, tmp_path):
    with pytest.raises(OffloadConfigError, match="policy: expected one of .*lfu, .*lru.*found .clairvoyant."):
        LLM(folder, progress=False, expert_budget=E, policy="clairvoyant", offload_dir=tmp_path)


class RecordingPolicy(LRUPolicy):
    """Records the hooks the runtime calls, to check what a policy is told."""

    name = "recording-test"
    wants_lookahead = True

    def __init__(self, num_layers, num_experts):
        super().__init__(num_layers, num_experts)
        self.events = []

    def begin_batch(self):
        self.events.append(("begin",))

    def observe(self, layer, token_counts):
        super().observe(layer, token_counts)
        self.events.append(("observe", layer, sum(token_counts)))

    def lookahead(self, layer, next_counts):
        self.events.append(("lookahead", layer, sum(next_counts)))

    def sequence_finished(self, eam):
        self.events.append(("finished", eam.copy()))


def test_policy_is_told_batches_routing_lookahead_and_finished_sequences(folder, resident, tmp_path):
    policy = RecordingPolicy(L, E)
    prompts, params = PROMPTS[:2], SamplingParams(max_new_tokens=4, ignore_eos=True)
    with LLM(folder, progress=False, expert_budget=E, policy=policy, offload_dir=tmp_path) as llm:
        llm.generate(prompts, params)
    top_k = 2
    assert policy.events[0] == ("begin",)
    observed = [e for e in policy.events if e[0] == "observe"]
    # prefill step (both prompts), then 3 decode steps of 2 tokens: every layer sees every token
    steps = [sum(map(len, prompts))] + [2, 2, 2]
    assert [(e[1], e[2]) for e in observed] == [(layer, t * top_k) for t in steps for layer in range(L)]
    lookaheads = [e for e in policy.events if e[0] == "lookahead"]
    assert [(e[1], e[2]) for e in lookaheads] == [(layer, t * top_k) for t in steps for layer in range(L - 1)]
    finished = [e[1] for e in policy.events if e[0] == "finished"]
    assert len(finished) == 2
    for prompt, eam in zip(prompts, finished):
        # every processed token (prompt + generated except the last) counted top_k times per layer
        assert eam.shape == (L, E)
        assert (eam.sum(axis=1) == (len(prompt) + 3) * top_k).all()
    with LLM(folder, progress=False, expert_budget=E, policy=policy, offload_dir=tmp_path) as llm:
        policy.events.clear()
        llm.logits(PROMPTS[0])
    assert policy.events[0] == ("begin",) and [e[1] for e in policy.events if e[0] == "observe"] == list(range(L))


def test_max_batch_tokens_chunks_steps_and_lowers_the_minimum_budget(folder, resident, tmp_path):
    chunked = LLM(folder, progress=False, max_batch_tokens=3)
    tokens = [o.token_ids for o in chunked.generate(PROMPTS, PARAMS)]
    assert tokens == resident[0]  # chunking changes float rounding only, not these greedy choices
    # 3 tokens a step route to at most 2 * 3 = 6 experts of a layer: 6 slots suffice
    with LLM(folder, progress=False, max_batch_tokens=3, expert_budget=6, offload_dir=tmp_path) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == tokens
        assert llm.experts.controller.residency.num_slots == 6
    with pytest.raises(OffloadConfigError, match="the minimum is 6 .*a step of 3 tokens"):
        LLM(folder, progress=False, max_batch_tokens=3, expert_budget=5, offload_dir=tmp_path)


def test_chunked_prefill_samples_once_per_sequence(folder):
    llm = LLM(folder, progress=False, max_batch_tokens=4)
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=5)
    outs = llm.generate(PROMPTS, params)
    assert [len(o.token_ids) for o in outs] == [3, 3, 3]
    assert llm.stats()["prefill_tokens"] == sum(map(len, PROMPTS))


class HeldLoads(InstantLoads):
    """A LoadMechanism whose loads land only when waited on: every prefetch is still in flight
    when its layer comes."""

    def __init__(self):
        super().__init__()
        self.promoted = []

    def start_load(self, key, slot, urgent):
        pass

    def promote(self, key, slot):
        self.promoted.append(key)


class NextLayerFirstExpert(LRUPolicy):
    """Prefetches expert 0 of the next layer."""

    name = "next-layer-test"

    def prefetch(self, layer):
        return [(layer + 1, 0)] if layer + 1 < self.num_layers else []


@pytest.mark.parametrize("mechanism, late", [(InstantLoads, 0), (HeldLoads, 1)])
def test_prefetch_hits_count_the_late_ones_apart(mechanism, late):
    """A prefetch hit whose load had not landed still stalls the layer: prefetch_late says how many."""
    loads, counters = mechanism(), TrafficCounters()
    controller = CacheController(4, 4, NextLayerFirstExpert(2, 4), loads, counters)
    controller.acquire(0, [1, 0, 0, 0])  # prefetches (1, 0)
    controller.release()
    controller.acquire(1, [1, 0, 0, 0])
    stats = counters.snapshot()
    assert stats["prefetches"] == 1 and stats["prefetch_hits"] == 1 and stats["prefetch_late"] == late
    assert getattr(loads, "promoted", [(1, 0)] * late) == [(1, 0)] * late
