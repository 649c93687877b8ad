"""The activation-aware policies: their EAM collection, their prediction, their choices, and
offloaded runs under them that stay exact."""

import json
import types

import numpy as np
import pytest
import torch

from moeinf import LLM, SamplingParams
from moeinf.errors import EAMCError, OffloadConfigError
from moeinf.runtime.cache.activation_aware import ActivationAwareLookaheadPolicy, ActivationAwarePolicy, LookaheadPolicy
from moeinf.runtime.cache.eam_collection import EAMCollection, normalise_rows
from moeinf.runtime.cache.registry import POLICIES, make_policy
from moeinf.runtime.setup import OffloadConfig
from tests.checkpoints import save_tiny_mixtral
from tests.paths import SHARED_TRACES
from tests.runtime.cache.keyed import victim

TRACES = SHARED_TRACES


def eam(rows):
    return np.array(rows, dtype=np.int64)


# ------------------------------------------------------------------ the collection


def test_collection_fills_to_capacity_then_replaces_the_most_similar_member():
    eamc = EAMCollection(num_layers=2, num_experts=3, capacity=2)
    a, b = eam([[4, 0, 0], [0, 4, 0]]), eam([[0, 0, 4], [0, 0, 4]])
    assert eamc.insert(a) == 0 and eamc.insert(b) == 1 and len(eamc) == 2
    near_b = eam([[0, 1, 7], [0, 0, 8]])
    assert eamc.insert(near_b) == 1  # full: replaces b, its most similar member, and keeps a
    assert len(eamc) == 2
    np.testing.assert_allclose(eamc.members[0], normalise_rows(a))
    np.testing.assert_allclose(eamc.members[1], normalise_rows(near_b))
    assert np.allclose(eamc.members.sum(axis=2), 1.0)  # rows are probabilities
    assert eamc.insert(np.zeros((2, 3))) == -1 and len(eamc) == 2  # an EAM without tokens teaches nothing


@pytest.mark.parametrize("bad", [np.zeros((3, 3)), np.full((2, 3), -1), np.full((2, 3), np.nan), [["a"] * 3] * 2])
def test_a_malformed_eam_is_a_named_error(bad):
    with pytest.raises(EAMCError, match="EAM: expected"):
        EAMCollection(2, 3, 4).insert(np.array(bad))


def test_bad_collection_settings_are_named_errors():
    with pytest.raises(EAMCError, match="capacity: expected a positive integer, found 0"):
        EAMCollection(2, 3, 0)


def test_save_and_load_round_trip(tmp_path):
    eamc = EAMCollection(3, 4, capacity=5)
    rng = np.random.default_rng(0)
    for _ in range(3):
        eamc.insert(rng.integers(0, 9, size=(3, 4)))
    path = tmp_path / "eamc.npz"
    eamc.save(path)
    loaded = EAMCollection.load(path)
    assert (loaded.num_layers, loaded.num_experts, loaded.capacity, len(loaded)) == (3, 4, 5, 3)
    assert np.array_equal(loaded.members, eamc.members)
    running = rng.integers(0, 5, size=(3, 4))
    assert np.array_equal(loaded.predict(running, 2, 2), eamc.predict(running, 2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["eamc.npz"]  # no temporary file left behind


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "eamc.npz"
    old = EAMCollection(2, 2, 3)
    old.insert(eam([[1, 0], [0, 1]]))
    old.save(path)
    before = path.read_bytes()
    new = EAMCollection(2, 2, 3)
    new.insert(eam([[0, 5], [5, 0]]))

    def torn_write(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", torn_write)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eamc.npz"]
    assert np.array_equal(EAMCollection.load(path).members, old.members)


def test_loading_a_file_that_is_not_a_collection_is_a_named_error(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(EAMCError, match="expected an .npz with 'members' and 'meta'"):
        EAMCollection.load(junk)
    wrong = tmp_path / "wrong.npz"
    np.savez(
        wrong,
        members=np.zeros((2, 5, 5)),
        meta=np.array(json.dumps({"format": 1, "num_layers": 2, "num_experts": 3, "capacity": 4})),
    )
    with pytest.raises(EAMCError, match=r"expected members \[<= 4, 2, 3\], found \[2, 5, 5\]"):
        EAMCollection.load(wrong)


def tiny_trace(experts, seq_starts, num_experts):
    experts = np.asarray(experts, dtype=np.int16)  # experts: [N, L, K]
    N, L, K = experts.shape
    return types.SimpleNamespace(
        experts=experts,
        weights=np.full((N, L, K), 1.0 / K, dtype=np.float16),
        seq_starts=np.asarray(seq_starts, dtype=np.int64),
        phase=np.ones(N, dtype=np.int8),
        meta={"model": "tiny", "num_layers": L, "num_experts": num_experts, "top_k": K, "source": "test"},
        lookahead=None,
    )


def test_warm_start_from_a_trace_holds_one_eam_per_sequence():
    # 3 tokens in sequence 0, 1 in sequence 1; 2 layers, top-2 of 4 experts
    trace = tiny_trace(
        [[[0, 1], [2, 3]], [[0, 2], [2, 3]], [[0, 1], [3, 1]], [[3, 2], [0, 1]]], seq_starts=[0, 3, 4], num_experts=4
    )
    eamc = EAMCollection.from_trace(trace, capacity=8)
    assert len(eamc) == 2
    np.testing.assert_allclose(eamc.members[0], normalise_rows(eam([[3, 2, 1, 0], [0, 1, 2, 3]])))
    np.testing.assert_allclose(eamc.members[1], normalise_rows(eam([[0, 0, 1, 1], [1, 1, 0, 0]])))
    assert len(EAMCollection.from_trace(trace, capacity=1)) == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("experts", np.full((4, 2, 2), 7), r"expected ids in \[0, 4\)"),
        ("experts", np.zeros((4, 3, 2), dtype=np.int16), r"expected integer \[N, 2, K\]"),
        ("seq_starts", np.array([0, 3]), "expected non-decreasing offsets from 0 to 4"),
        ("meta", {"model": "tiny"}, "expected num_layers and num_experts"),
    ],
)
def test_a_malformed_trace_is_a_named_error(field, value, message):
    trace = tiny_trace(np.zeros((4, 2, 2)), seq_starts=[0, 4], num_experts=4)
    setattr(trace, field, value)
    with pytest.raises(EAMCError, match=message):
        EAMCollection.from_trace(trace, capacity=2)


@pytest.mark.skipif(not (TRACES / "mixtral-8x7b-gsm8k.npz").exists(), reason="no shared traces here")
def test_warm_start_from_the_shared_gsm8k_trace():
    with np.load(TRACES / "mixtral-8x7b-gsm8k.npz") as data:
        eamc = EAMCollection.from_trace(data, capacity=16)
        experts, starts = data["experts"], data["seq_starts"]
    assert (eamc.num_layers, eamc.num_experts, len(eamc)) == (32, 8, len(starts) - 1)
    counts = np.zeros((32, 8))
    for token in experts[starts[0] : starts[1]]:  # token: [L, K]
        for layer, ids in enumerate(token):
            counts[layer, ids] += 1
    np.testing.assert_allclose(eamc.members[0], normalise_rows(counts))


# ------------------------------------------------------------------ prediction


def test_a_member_identical_to_the_running_prefix_predicts_its_own_future():
    rng = np.random.default_rng(1)
    eamc = EAMCollection(6, 5, capacity=8)
    members = [rng.integers(0, 10, size=(6, 5)) for _ in range(5)]
    for m in members:
        eamc.insert(m)
    target = members[3]
    running = np.zeros((6, 5))
    running[:2] = target[:2] * 3  # the running batch has routed layers 0 and 1, like member 3, more tokens
    np.testing.assert_allclose(eamc.predict(running, seen=2, matches=1), normalise_rows(target))
    assert eamc.predict(running, seen=0, matches=1) is None  # nothing routed yet: nothing to match
    assert EAMCollection(6, 5, 2).predict(running, 2, 1) is None  # nothing learned yet


def test_several_matches_mix_by_similarity():
    eamc = EAMCollection(2, 2, capacity=4)
    eamc.insert(eam([[1, 0], [1, 0]]))
    eamc.insert(eam([[0, 1], [0, 1]]))
    running = np.array([[3.0, 1.0], [0.0, 0.0]])
    sims = np.array([3, 1]) / np.sqrt(10)
    expected = sims / sims.sum()  # layer 1 = the similarity-weighted average of the members' rows
    np.testing.assert_allclose(eamc.predict(running, seen=1, matches=2)[1], expected)


# ------------------------------------------------------------------ the policies' choices


def test_policies_are_registered_and_activation_aware_is_the_default():
    assert {"activation-aware", "lookahead", "activation-aware+lookahead"} <= set(POLICIES)
    assert OffloadConfig().policy == "activation-aware"
    policy = make_policy("activation-aware+lookahead", 4, 8)
    assert isinstance(policy, ActivationAwarePolicy) and policy.wants_lookahead
    assert not make_policy("activation-aware", 4, 8).wants_lookahead


def test_activation_aware_prefetches_the_likeliest_expert_of_the_next_layer():
    policy = ActivationAwarePolicy(3, 4)
    policy.begin_batch()
    for _ in range(3):  # three steps: layer 1 keeps routing to expert 2 (and 0 once)
        policy.observe(0, [1, 1, 0, 0])
        policy.observe(1, [0, 0, 1, 1] if _ else [1, 0, 1, 0])
        policy.observe(2, [0, 1, 1, 0])
    policy.observe(0, [1, 0, 1, 0])
    assert policy.prefetch(0) == [(1, 2)]


def test_a_prediction_is_prefetched_only_when_the_step_is_likely_to_use_it():
    """One token, top-2: an expert predicted at p is used with probability 1 - (1 - p)^2, which
    must reach 1/2 (p >= 0.293); with 4 tokens (8 routings) the same p = 0.25 is likely enough."""

    def predicted(min_use: float, tokens: int) -> ActivationAwarePolicy:
        policy = ActivationAwarePolicy(2, 8, prior_weight=1e-9, min_use=min_use)  # pred = the counts alone
        policy.begin_batch()
        policy.observe(0, [tokens] * 2 + [0] * 6)
        policy.observe(1, [2 * tokens] * 2 + [tokens] * 4 + [0] * 2)
        policy.observe(0, [tokens] * 2 + [0] * 6)
        return policy

    one = predicted(0.5, 1)  # layer 1: experts 0 and 1 at 0.25 each
    assert one.pred[1, 0] == pytest.approx(0.25) and one.min_pred() == pytest.approx(1 - 0.5**0.5)
    assert one.prefetch(0) == []
    assert predicted(0.5, 4).prefetch(0) == [(1, 0)]  # 8 routings: 1 - 0.75^8 = 0.9
    assert predicted(0.0, 1).prefetch(0) == [(1, 0)]  # min_use 0: any predicted expert
    assert predicted(0.85, 4).prefetch(0) == [(1, 0)] and predicted(0.95, 4).prefetch(0) == []


def test_activation_aware_evicts_the_layer_just_computed_and_the_unlikely_first():
    policy = ActivationAwarePolicy(3, 2)
    policy.begin_batch()
    for _ in range(4):
        for layer in range(3):
            policy.observe(layer, [2, 0])  # expert 0 everywhere, expert 1 never
    policy.observe(0, [2, 0])
    # layer 0 just ran: its experts are needed last; within a layer, the unused expert goes first
    assert victim(policy, [(1, 0), (2, 0), (0, 0)]) == (0, 0)
    assert victim(policy, [(1, 0), (1, 1), (2, 0)]) == (1, 1)
    assert victim(policy, [(1, 0), (2, 0)]) == (2, 0)  # layer 1 runs next: keep it


def test_a_prefetch_never_evicts_what_the_last_step_used():
    """The working-set guard: a prefetch gets the victim a miss would get, unless that expert
    served one of the last L routed layers; with guard=False, whatever its last use."""
    layer_of, expert_of = np.array([0, 1]), np.array([0, 0])  # slots hold (0, 0) and (1, 0)
    both, only_layer_1 = np.array([True, True]), np.array([False, True])
    for guard in (True, False):
        policy = ActivationAwarePolicy(2, 2, guard=guard)
        policy.begin_batch()
        policy.observe(0, [1, 0])
        policy.observe(1, [1, 0])
        policy.observe(0, [0, 1])  # step 2: layer 0 moved to expert 1; (0, 0) last served 2 layers ago
        assert policy.victim_slot(layer_of, expert_of, both) == 0  # the layer just computed goes first
        assert policy.prefetch_victim_slot(layer_of, expert_of, both) == 0  # a step ago: no longer guarded
        assert policy.victim_slot(layer_of, expert_of, only_layer_1) == 1
        # (1, 0) served the previous layer-step, within the last L = 2: a miss may take it, a prefetch not
        assert policy.prefetch_victim_slot(layer_of, expert_of, only_layer_1) == (-1 if guard else 1)


def test_a_promotion_takes_only_a_victim_predicted_less_likely():
    """A host-computed expert is promoted over the prefetch's victim only when the prediction
    values it more: a swap of equals, or for a likelier expert, spends the link for nothing."""
    layer_of, expert_of = np.array([1, 1]), np.array([0, 1])  # slots hold (1, 0) and (1, 1)
    evictable = np.array([True, True])
    policy = ActivationAwarePolicy(2, 2, guard=False)
    policy.begin_batch()
    for _ in range(3):
        policy.observe(0, [1, 1])  # layer 0: both experts as likely
        policy.observe(1, [2, 0])  # layer 1: expert 0 always, expert 1 never
    victim_slot = policy.prefetch_victim_slot(layer_of, expert_of, evictable)
    assert victim_slot == 1  # the unused (1, 1)
    assert policy.pred[0, 0] > policy.pred[1, 1]
    assert policy.promotion_victim_slot((0, 0), layer_of, expert_of, evictable) == victim_slot
    assert policy.promotion_victim_slot((1, 1), layer_of, expert_of, evictable) == -1  # itself: no gain
    only_busy = np.array([True, False])  # only (1, 0), predicted above any layer-0 expert, may go
    assert policy.pred[1, 0] > policy.pred[0, 0]
    assert policy.promotion_victim_slot((0, 0), layer_of, expert_of, only_busy) == -1


def test_finished_sequences_teach_the_next_batch():
    policy = ActivationAwarePolicy(3, 4, prefetch=1, prior_weight=1e6)
    finished = eam([[4, 0, 0, 0], [0, 0, 0, 4], [0, 4, 0, 0]])
    policy.sequence_finished(finished)
    policy.sequence_finished(eam([[0, 0, 4, 0], [4, 0, 0, 0], [0, 0, 4, 0]]))
    policy.begin_batch()
    policy.observe(0, [1, 0, 0, 0])  # begins like the first finished sequence...
    assert policy.prefetch(0) == [(1, 3)]  # ...so layer 1 is predicted to go where it went
    np.testing.assert_allclose(policy.prior, normalise_rows(finished))


def test_lookahead_prefetches_what_the_next_router_picks():
    policy = LookaheadPolicy(4, 8)
    policy.begin_batch()
    policy.lookahead(1, [0, 0, 3, 0, 0, 1, 0, 0])
    policy.observe(1, [1, 1, 0, 0, 0, 0, 0, 0])
    assert policy.prefetch(1) == [(2, 2), (2, 5)]  # most tokens first; nothing predicted beyond
    policy.observe(2, [0, 0, 1, 0, 0, 1, 0, 0])
    assert policy.prefetch(2) == []  # the lookahead is used once


def test_the_blend_puts_the_lookahead_before_its_own_prediction():
    policy = ActivationAwareLookaheadPolicy(3, 4, prefetch=2)
    policy.begin_batch()
    for _ in range(3):
        policy.observe(0, [1, 1, 0, 0])
        policy.observe(1, [0, 1, 1, 0])
        policy.observe(2, [1, 0, 0, 1])
    policy.lookahead(0, [0, 0, 0, 2])
    policy.observe(0, [1, 1, 0, 0])
    assert policy.prefetch(0) == [(1, 3), (1, 1), (1, 2)]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"decay": 0.0}, "decay"),
        ({"prefetch": -1}, "prefetch"),
        ({"horizon": 1.5}, "horizon"),
        ({"prior_weight": -2}, "prior_weight"),
        ({"min_use": 1.5}, "min_use: expected a probability in"),
        ({"guard": "yes"}, "guard: expected True or False"),
    ],
)
def test_bad_policy_settings_are_named_errors(settings, message):
    with pytest.raises(OffloadConfigError, match=message):
        ActivationAwarePolicy(4, 8, **settings)


def test_a_collection_of_another_shape_is_a_named_error():
    with pytest.raises(OffloadConfigError, match="EAMC: expected one for 4 layers x 8 experts, found 4 x 6"):
        ActivationAwarePolicy(4, 8, EAMCollection(4, 6, 2))


# ------------------------------------------------------------------ exact offloaded runs

L, E = 4, 8
PROMPTS = [[5, 9, 13, 2, 7], list(range(3, 20)), [17]]
PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)
ROUNDS = 2  # generate calls: the second runs with the EAMC holding the first one's sequences


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("activation")
    save_tiny_mixtral(folder, seed=7, num_local_experts=E, num_hidden_layers=L)
    return folder


@pytest.fixture(scope="module")
def resident(folder):
    llm = LLM(folder, progress=False)
    rounds = [[o.token_ids for o in llm.generate(PROMPTS[i:] + PROMPTS[:i], PARAMS)] for i in range(ROUNDS)]
    return rounds, llm.logits(PROMPTS[1])


@pytest.mark.parametrize(
    "policy, guard, budget",
    [
        # unguarded at budgets below the batch's working set (3 prompts x top-2 x 4 layers), so
        # that prefetches evict: the prefetch, eviction and cancellation paths all run
        ("activation-aware", False, E),
        ("activation-aware", False, 13),
        ("lookahead", False, E),
        ("activation-aware+lookahead", False, E),
        # the default, guarded: there every victim a prefetch could take served the last step
        ("activation-aware", True, E),
        ("activation-aware+lookahead", True, 13),
    ],
)
def test_offloaded_run_equals_resident_run(folder, resident, tmp_path, policy, guard, budget):
    rounds, logits = resident
    chosen = POLICIES[policy](L, E, guard=guard)
    with LLM(folder, progress=False, expert_budget=budget, policy=chosen, offload_dir=tmp_path) as llm:
        for i, tokens in enumerate(rounds):
            assert [o.token_ids for o in llm.generate(PROMPTS[i:] + PROMPTS[:i], PARAMS)] == tokens
            if i == 0:
                assert len(llm.policy.eamc) == len(PROMPTS)
                first = llm.stats()
        assert not np.allclose(llm.policy.prior, 1.0 / E)  # the second round was matched against the EAMC
        assert torch.equal(llm.logits(PROMPTS[1]), logits)
        stats = llm.stats()
    assert stats["misses"] > 0 and stats["resident_experts"] <= budget
    if guard:
        assert stats["prefetch_declined"] > first["prefetch_declined"] > 0
    else:
        assert stats["prefetch_hits"] > first["prefetch_hits"]  # prefetches made with the EAMC filled were used
