"""Scorer microbenchmark: the Numba scorer against its numpy reference, per call, in one run; and
what one eviction costs the cache controller, per policy.

Run:  .venv/bin/python -m pytest bench/scorer.py --benchmark-only -q
      (add --benchmark-columns=min,median,mean,rounds or --benchmark-json=FILE as wanted)

The default test run (testpaths = tests) never collects this file; it runs only when named.

Shapes (layers x experts): 32x8 (Mixtral-8x7B), 48x128 (Qwen3-30B-A3B), 58x256 (DeepSeek-V3's
MoE layers). pred [L, E] is random with rows normalised, as the policy keeps it.
  prefetch: prefetch_order over every layer ahead of the middle one (horizon L - 1), n = 16: the
    most the scorer is asked; the policy's default (horizon 1, n = 1) reads one row.
  evict: eviction_order_slots, the single lowest-priority slot of a pool of C = L * E / 4 slots
    holding a quarter of the experts (slot arrays layer_of, expert_of [C] int64 and the evictable
    mask [C] bool, every slot evictable: the most a victim call sees there).
  policy prefetch: ActivationAwarePolicy.prefetch(layer) at its defaults, with the Python around
    the scorer (keys back into tuples).
  policy step: one MoE layer of a decode step for the policy: lookahead (for the +lookahead
    blend), observe and prefetch, routing to min(8, E) experts. At 58x256, median: activation-aware
    21.8 us, +lookahead 38.2 us (73.4 us while the lookahead's picks were listed by sorting all E
    experts in Python).
  victim / claim: a Residency of C = L * E / 4 slots, all READY and unpinned, and a policy that
    has observed a few steps. victim is what CacheController._claim asks the policy per eviction:
    policy.victim_slot over the residency's slot arrays (layer_of, expert_of, evictable_mask), its
    slot checked against the numpy references (eviction_order_slots_ref, lowest_slot_ref);
    claim is a whole eviction: that, evicting the victim, and assigning and landing a key in the
    freed slot (the victim's own key, so every round starts from the same pool).
Every figure is a per-call time; the numba and numpy rows of a group are the same call with the
same result (asserted). Compile time is excluded (one call before timing; cache=True keeps the
compiled code between runs).

Measured on a 2-core x86 VM (Python 3.11, Numba 0.68), median per call at 58x256 (C = 3712 slots):
while the controller scanned the slots into a list of (layer, expert) tuples and the policy scanned
those again in Python (Residency.evictable(), then policy.victim(candidates)), victim took 1.5 ms
(activation-aware), 1.4 ms (lru), 1.6 ms (lfu) and claim 1.0 / 1.4 / 2.5 ms; with the evictable set
kept as arrays, victim 10.6 / 11.1 / 11.3 us and claim 13.3 / 13.6 / 13.7 us, what one compiled pass
over 3712 slots costs (evict 58x256 numba, the same compiled pass: 10.9 us, when it was timed through
a wrapper over a [C, 2] key array).
"""

from __future__ import annotations

import numpy as np
import pytest

from moeinf.runtime.cache.activation_aware import ActivationAwareLookaheadPolicy, ActivationAwarePolicy
from moeinf.runtime.cache.policy import LFUPolicy, LRUPolicy
from moeinf.runtime.cache.residency import Residency
from moeinf.runtime.cache.scorer import (
    eviction_order_slots,
    eviction_order_slots_ref,
    lowest_slot_ref,
    prefetch_order,
    prefetch_order_ref,
)

SHAPES = [(32, 8), (48, 128), (58, 256)]
EPS = 1e-3
PREFETCH_N = 16
POLICIES = {"activation-aware": ActivationAwarePolicy, "lru": LRUPolicy, "lfu": LFUPolicy}


@pytest.fixture(params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}", scope="module")
def case(request):
    L, E = request.param
    rng = np.random.default_rng(0)
    pred = rng.random((L, E))
    pred /= pred.sum(axis=1, keepdims=True)  # pred: [L, E]
    flat = rng.permutation(L * E)[: L * E // 4]
    keys = np.stack([flat // E, flat % E], axis=1).astype(np.int64)  # keys: [C, 2] the (layer, expert) of slot c
    return L, E, pred, keys


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_prefetch(benchmark, case, impl):
    L, E, pred, _ = case
    fn = prefetch_order if impl == "numba" else prefetch_order_ref
    args = (pred, L // 2, L - 1, PREFETCH_N, 0.0)
    assert np.array_equal(fn(*args), prefetch_order_ref(*args))
    benchmark.group = f"prefetch {L}x{E}"
    benchmark(fn, *args)


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_evict(benchmark, case, impl):
    L, E, pred, keys = case
    fn = eviction_order_slots if impl == "numba" else eviction_order_slots_ref
    layer_of, expert_of = np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1])  # [C] int64 each
    evictable = np.ones(len(keys), np.bool_)  # [C]: every slot a candidate
    args = (pred, layer_of, expert_of, evictable, L // 2, 1, EPS)
    assert np.array_equal(fn(*args), eviction_order_slots_ref(*args))
    benchmark.group = f"evict {L}x{E}"
    benchmark(fn, *args)


def test_policy_prefetch(benchmark, case):
    L, E, pred, _ = case
    policy = ActivationAwarePolicy(L, E)
    policy.begin_batch()
    policy.observe(0, [1] * E)
    policy.pred[:] = pred
    benchmark.group = f"policy {L}x{E}"
    benchmark(policy.prefetch, L // 2)


@pytest.mark.parametrize("name", ["activation-aware", "activation-aware+lookahead"])
def test_policy_step(benchmark, case, name):
    """What the policy costs per MoE layer of a decode step: (lookahead,) observe, prefetch, for a
    batch of one routing to min(8, E) experts, the next layer's router picking as many."""
    L, E, _, _ = case
    rng = np.random.default_rng(2)
    policy = (ActivationAwareLookaheadPolicy if name.endswith("lookahead") else ActivationAwarePolicy)(L, E)
    policy.begin_batch()
    picks = [rng.choice(E, size=min(8, E), replace=False) for _ in range(2 * L)]
    steps = []
    for layer in range(L):
        counts, ahead = np.zeros(E, np.int64), np.zeros(E, np.int64)  # [E] each
        counts[picks[layer]], ahead[picks[L + layer]] = 1, 1
        steps.append((layer, counts.tolist(), ahead.tolist()))
    position = iter(range(10**9))

    def step():
        layer, counts, ahead = steps[next(position) % L]
        if policy.wants_lookahead:
            policy.lookahead(layer, ahead)
        policy.observe(layer, counts)
        return policy.prefetch(layer)

    benchmark.group = f"policy step {L}x{E}"
    benchmark(step)


def full_pool(case, name):
    """(policy, residency): C slots all READY and unpinned; the policy has seen 4 random steps
    (activation-aware: then its prediction is set to the case's, at the middle layer)."""
    L, E, pred, keys = case
    rng = np.random.default_rng(1)
    policy = POLICIES[name](L, E)
    policy.begin_batch()
    for _ in range(4):
        for layer in range(L):
            counts = np.zeros(E, np.int64)  # [E]
            counts[rng.choice(E, size=min(8, E), replace=False)] = rng.integers(1, 4, size=min(8, E))
            policy.observe(layer, counts.tolist())
    if name == "activation-aware":
        policy.observe(L // 2, [1] * E)
        policy.pred[:] = pred
    res = Residency(len(keys))
    for slot, (layer, expert) in enumerate(keys.tolist()):
        res.assign((layer, expert), slot)
        res.mark_ready(slot)
    return policy, res


def choose(policy, res) -> int:
    """What CacheController._claim asks the policy for one eviction."""
    return policy.victim_slot(res.layer_of, res.expert_of, res.evictable_mask)


def reference_victim(policy, res) -> int:
    """The slot the numpy references pick for `choose`, from the policy's own priorities."""
    slots = (res.layer_of, res.expert_of, res.evictable_mask)
    if isinstance(policy, ActivationAwarePolicy):
        return int(eviction_order_slots_ref(policy.pred, *slots, policy.layer, 1, policy.eps)[0])
    if isinstance(policy, LFUPolicy):  # before LRU: LFUPolicy is one
        return lowest_slot_ref(policy.tokens, policy.last_use, *slots)
    return lowest_slot_ref(policy.last_use, policy.last_use, *slots)


@pytest.mark.parametrize("name", list(POLICIES))
def test_victim(benchmark, case, name):
    L, E, _, _ = case
    policy, res = full_pool(case, name)
    assert choose(policy, res) == reference_victim(policy, res)
    benchmark.group = f"victim {L}x{E}"
    benchmark(choose, policy, res)


@pytest.mark.parametrize("name", list(POLICIES))
def test_claim(benchmark, case, name):
    L, E, _, _ = case
    policy, res = full_pool(case, name)

    def claim():
        key = res.key_in[choose(policy, res)]
        slot = res.evict(key)
        res.assign(key, slot)
        res.mark_ready(slot)

    benchmark.group = f"claim {L}x{E}"
    benchmark(claim)
