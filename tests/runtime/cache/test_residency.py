"""The residency keeps its evictable set as slots change state; under any sequence of transitions
it equals what a scan of every slot finds, and every policy picks from it the victim the old
per-candidate scan picked."""


import numpy as np
import pytest

from moeinf.runtime.cache.activation_aware import ActivationAwarePolicy
from moeinf.runtime.cache.policy import LFUPolicy, LRUPolicy
from moeinf.runtime.cache.residency import Residency, ResidencyError, SlotState
from moeinf.runtime.cache.scorer import eviction_order_slots, eviction_order_slots_ref, lowest_slot, lowest_slot_ref
from moeinf.runtime.replay.belady import BeladyPolicy
from tests.runtime.cache.keyed import evictable_keys, victim


class Model:
    """The residency's meaning, kept the plain way: a dict per slot."""

    def __init__(self, num_slots):
        self.slots = [None] * num_slots  # per slot: None, or {"key", "state", "pins"}

    def evictable(self):
        return [s for s, v in enumerate(self.slots) if v and v["state"] == SlotState.READY and v["pins"] == 0]


def scan(res):
    """What the evictable set should be, by a scan of every slot of `res`."""
    mask = np.array(
        [
            key is not None and state == SlotState.READY and pins == 0
            for key, state, pins in zip(res.key_in, res.state, res.pins)
        ],
        dtype=bool,
    )  # [S]
    layer_of = np.array([-1 if key is None else key[0] for key in res.key_in], dtype=np.int64)  # [S]
    expert_of = np.array([-1 if key is None else key[1] for key in res.key_in], dtype=np.int64)  # [S]
    return mask, layer_of, expert_of


def check(res, model):
    mask, layer_of, expert_of = scan(res)
    assert np.array_equal(res.evictable_mask, mask)
    assert np.array_equal(res.layer_of, layer_of) and np.array_equal(res.expert_of, expert_of)
    assert res.evictable_count == int(mask.sum())
    assert np.flatnonzero(mask).tolist() == model.evictable()
    assert evictable_keys(res) == [res.key_in[s] for s in model.evictable()]
    assert res.loading() == [s for s, v in enumerate(model.slots) if v and v["state"] == SlotState.LOADING]
    assert res.resident() == sum(1 for v in model.slots if v and v["state"] == SlotState.READY)
    for slot, v in enumerate(model.slots):
        assert res.key_in[slot] == (v["key"] if v else None)
        assert res.state[slot] == (v["state"] if v else SlotState.EMPTY)
        assert res.pins[slot] == (v["pins"] if v else 0)
        if v:
            assert res.slot(v["key"]) == slot
    empty = [s for s, v in enumerate(model.slots) if v is None]
    assert (res.free_slot() is None) == (not empty) and (res.free_slot() is None or res.free_slot() in empty)


@pytest.mark.parametrize("seed", range(6))
def test_evictable_set_matches_a_scan_under_random_transitions(seed):
    rng = np.random.default_rng(seed)
    S, L, E = int(rng.integers(1, 24)), 5, 7
    res, model = Residency(S), Model(S)
    for _ in range(1500):
        slots = {
            state: [s for s, v in enumerate(model.slots) if (v["state"] if v else SlotState.EMPTY) == state]
            for state in SlotState
        }
        held = slots[SlotState.LOADING] + slots[SlotState.READY]
        op = rng.choice(["assign", "ready", "pin", "unpin", "evict", "fail"])
        if op == "assign" and slots[SlotState.EMPTY]:
            taken = {v["key"] for v in model.slots if v}
            free = [(layer, e) for layer in range(L) for e in range(E) if (layer, e) not in taken]
            key = free[int(rng.integers(len(free)))]
            # mostly the slot free_slot() offers, as the controller does; sometimes any empty one
            slot = res.free_slot() if rng.random() < 0.7 else int(rng.choice(slots[SlotState.EMPTY]))
            res.assign(key, slot)
            model.slots[slot] = {"key": key, "state": SlotState.LOADING, "pins": 0}
        elif op == "ready" and slots[SlotState.LOADING]:
            slot = int(rng.choice(slots[SlotState.LOADING]))
            res.mark_ready(slot)
            model.slots[slot]["state"] = SlotState.READY
        elif op == "pin" and held:
            slot = int(rng.choice(held))
            res.pin(slot)
            model.slots[slot]["pins"] += 1
        elif op == "unpin" and any(model.slots[s]["pins"] for s in held):
            slot = int(rng.choice([s for s in held if model.slots[s]["pins"]]))
            res.unpin(slot)
            model.slots[slot]["pins"] -= 1
        elif op == "evict" and any(model.slots[s]["pins"] == 0 for s in held):
            slot = int(rng.choice([s for s in held if model.slots[s]["pins"] == 0]))
            assert res.evict(model.slots[slot]["key"]) == slot
            model.slots[slot] = None
        elif op == "fail" and held:  # a load failed: the controller drops its pins and evicts it
            slot = int(rng.choice(held))
            res.unpin_all(slot)
            model.slots[slot]["pins"] = 0
            if rng.random() < 0.8:
                res.evict(model.slots[slot]["key"])
                model.slots[slot] = None
        check(res, model)


def test_policies_see_read_only_arrays():
    res = Residency(4)
    res.assign((0, 1), 0)
    for array in (res.layer_of, res.expert_of, res.evictable_mask):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 1
    res.mark_ready(0)
    assert res.evictable_mask.tolist() == [True, False, False, False]  # the views follow the residency


def test_bad_transitions_are_named_errors():
    res = Residency(2)
    res.assign((0, 0), 0)
    with pytest.raises(ResidencyError, match="assign.*expected an empty slot"):
        res.assign((0, 1), 0)
    with pytest.raises(ResidencyError, match="assign.*key held nowhere"):
        res.assign((0, 0), 1)
    res.mark_ready(0)
    with pytest.raises(ResidencyError, match="mark_ready.*expected a LOADING slot, found READY"):
        res.mark_ready(0)
    with pytest.raises(ResidencyError, match="unpin.*expected a pinned slot"):
        res.unpin(0)
    res.pin(0)
    with pytest.raises(ResidencyError, match=r"evict\(\(0, 0\)\).*pinned 1 times"):
        res.evict((0, 0))
    with pytest.raises(ResidencyError, match=r"evict\(\(1, 1\)\).*found it nowhere"):
        res.evict((1, 1))


# ------------------------------------------------------------------ victims


def old_victim(policy, candidates):
    """The victim as it was chosen before the residency kept its evictable set: a Python scan of
    the candidate keys, in slot order."""
    if isinstance(policy, LFUPolicy):
        return min(candidates, key=lambda k: (policy.tokens[k], policy.last_use[k], k))
    if isinstance(policy, LRUPolicy):
        return min(candidates, key=lambda k: (policy.last_use[k], k))
    if isinstance(policy, BeladyPolicy):
        return max(candidates, key=lambda k: policy.next_use[k])
    L = policy.num_layers
    priority = [(policy.pred[k] + policy.eps) * (1 - ((k[0] - policy.layer - 1) % L) / L) for k in candidates]
    return candidates[int(np.argmin(priority))]  # the first of the lowest


def random_accesses(rng, L, E, steps):
    return [(layer, sorted(rng.choice(E, size=2, replace=False).tolist())) for _ in range(steps) for layer in range(L)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["lru", "lfu", "activation-aware", "belady"])
def test_victim_slot_picks_what_the_scan_of_every_candidate_picked(kind, seed):
    rng = np.random.default_rng(seed)
    L, E, S = 4, 6, 12
    accesses = random_accesses(rng, L, E, 40)
    policy = {
        "lru": lambda: LRUPolicy(L, E),
        "lfu": lambda: LFUPolicy(L, E),
        "activation-aware": lambda: ActivationAwarePolicy(L, E),
        "belady": lambda: BeladyPolicy(L, E, accesses),
    }[kind]()
    policy.begin_batch()
    res = Residency(S)
    for layer, experts in accesses:
        counts = [0] * E
        for e in experts:
            counts[e] = int(rng.integers(1, 4))
        policy.observe(layer, counts)
        # a random pool: slots filled with random keys, some loading, some pinned, some empty
        for slot in range(S):
            if res.key_in[slot] is not None:
                res.unpin_all(slot)
                res.evict(res.key_in[slot])
        keys = rng.permutation(L * E)[:S]
        for slot, flat in enumerate(keys.tolist()):
            if rng.random() < 0.2:
                continue
            res.assign((flat // E, flat % E), slot)
            if rng.random() < 0.8:
                res.mark_ready(slot)
            if rng.random() < 0.2:
                res.pin(slot)
        if not res.evictable_count:
            continue
        chosen = policy.victim_slot(res.layer_of, res.expert_of, res.evictable_mask)
        assert res.key_in[chosen] == old_victim(policy, evictable_keys(res))
        assert victim(policy, evictable_keys(res)) == res.key_in[chosen]  # the keys-in convenience agrees


@pytest.mark.parametrize("seed", range(4))
def test_slot_scans_agree_with_their_numpy_versions(seed):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        L, E, S = int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(0, 20))
        pred = np.round(rng.random((L, E)) * 3) / 3  # ties and zeros
        first, second = rng.integers(-1, 3, (L, E)), rng.integers(-1, 3, (L, E))  # ties
        flat = rng.permutation(L * E)[:S]
        layer_of, expert_of = flat // E, flat % E  # [S'] int64
        evictable = rng.random(len(flat)) < 0.6
        layer, n = int(rng.integers(-1, L)), int(rng.integers(0, 6))
        assert np.array_equal(
            eviction_order_slots(pred, layer_of, expert_of, evictable, layer, n, 1e-3),
            eviction_order_slots_ref(pred, layer_of, expert_of, evictable, layer, n, 1e-3),
        )
        assert lowest_slot(first, second, layer_of, expert_of, evictable) == lowest_slot_ref(
            first, second, layer_of, expert_of, evictable
        )


def test_a_policy_overriding_only_the_keys_in_victim_is_refused():
    with pytest.raises(TypeError, match="OldStyle: expected victims chosen by victim_slot"):

        class OldStyle(LRUPolicy):
            def victim(self, candidates):
                return candidates[0]
