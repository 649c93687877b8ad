"""The Numba scorer orders prefetches and victims by the documented priorities, and its numpy
reference (what bench/scorer.py times it against) gives the very same orders."""

import numpy as np
import pytest

from moeinf.runtime.cache.scorer import (
    eviction_order_ref,
    eviction_order_slots,
    lowest_slot,
    prefetch_order,
    prefetch_order_ref,
)
from tests.runtime.cache.keyed import eviction_order


def keys_of(flat, E):
    return [(int(f) // E, int(f) % E) for f in flat]


def test_prefetch_ranks_by_prediction_weighted_by_nearness():
    L, E = 4, 3
    pred = np.zeros((L, E))  # pred: [L, E]
    pred[1] = [0.1, 0.6, 0.3]
    pred[2] = [0.0, 0.0, 0.65]  # a little likelier than (1, 1), but a layer farther: 0.65 * 2/4 < 0.6 * 3/4
    order = prefetch_order(pred, 0, 3, 4, 0.0)
    assert keys_of(order, E) == [(1, 1), (2, 2), (1, 2), (1, 0)]
    assert keys_of(prefetch_order(pred, 0, 1, 10, 0.0), E) == [(1, 1), (1, 2), (1, 0)]  # one layer ahead only
    assert len(prefetch_order(pred, 0, 3, 0, 0.0)) == 0


def test_prefetch_wraps_past_the_last_layer_and_skips_zero_priorities():
    L, E = 3, 2
    pred = np.zeros((L, E))
    pred[0] = [0.0, 1.0]
    # at the last layer, the next step's layer 0 is next; zero predictions are never prefetched
    assert keys_of(prefetch_order(pred, 2, 1, 5, 0.0), E) == [(0, 1)]
    assert len(prefetch_order(np.zeros((L, E)), 0, 2, 5, 0.0)) == 0
    # the horizon never wraps back onto the current layer
    assert all(k[0] != 1 for k in keys_of(prefetch_order(np.ones((L, E)), 1, 10, 10, 0.0), E))


def test_prefetch_leaves_out_experts_predicted_below_the_floor():
    L, E = 4, 3
    pred = np.zeros((L, E))
    pred[1] = [0.1, 0.6, 0.3]
    pred[2] = [0.0, 0.0, 0.65]
    # (2, 2) passes the floor though a layer farther; (1, 2) and (1, 0) do not
    assert keys_of(prefetch_order(pred, 0, 3, 4, 0.5), E) == [(1, 1), (2, 2)]
    assert keys_of(prefetch_order(pred, 0, 3, 4, 0.6), E) == [(1, 1), (2, 2)]  # at the floor is in
    assert len(prefetch_order(pred, 0, 3, 4, 0.7)) == 0


def test_eviction_keeps_the_layers_needed_soonest():
    L, E = 4, 2
    pred = np.full((L, E), 0.5)
    keys = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], dtype=np.int64)  # keys: [C, 2] (layer, expert)
    # layer 1 computes now: layer 2 runs next (kept longest), layer 1 itself runs last (evicted first)
    assert eviction_order(pred, keys, 1, 4, 1e-3).tolist() == [1, 0, 3, 2]
    # before any layer (-1) the distance is the layer index: MoE-Infinity's (pred + eps) * (1 - i / L)
    assert eviction_order(pred, keys, -1, 4, 1e-3).tolist() == [3, 2, 1, 0]


def test_eviction_ranks_by_prediction_within_a_layer_and_eps_orders_unpredicted_by_distance():
    pred = np.array([[0.2, 0.0, 0.8], [0.0, 0.0, 1.0]])
    keys = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]], dtype=np.int64)
    order = eviction_order(pred, keys, 1, 5, 1e-3)  # layer 0 runs next
    # never-predicted experts go first, the farther layer's before the nearer's; ties keep candidate order
    assert keys[order].tolist() == [[1, 0], [1, 1], [0, 1], [0, 0], [0, 2]]
    assert eviction_order(pred, keys, 1, 1, 1e-3).tolist() == [3]
    assert len(eviction_order(pred, keys[:0], 1, 3, 1e-3)) == 0


@pytest.mark.parametrize("seed", range(4))
def test_numba_and_numpy_versions_agree(seed):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        L, E = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        pred = rng.random((L, E))
        if rng.random() < 0.5:
            pred = np.round(pred * 3) / 3  # ties and zeros
        layer, horizon, n = int(rng.integers(-1, L)), int(rng.integers(0, L + 2)), int(rng.integers(0, 12))
        floor = float(rng.choice([0.0, 1 / 3, rng.random()]))
        got = prefetch_order(pred, layer, horizon, n, floor)
        assert np.array_equal(got, prefetch_order_ref(pred, layer, horizon, n, floor))
        flat = rng.permutation(L * E)[: int(rng.integers(0, L * E + 1))]
        keys = np.stack([flat // E, flat % E], axis=1).astype(np.int64)
        assert np.array_equal(
            eviction_order(pred, keys, layer, n, 1e-3), eviction_order_ref(pred, keys, layer, n, 1e-3)
        )


def test_slot_scans_skip_what_is_not_evictable_and_break_ties_as_documented():
    pred = np.full((2, 3), 0.5)  # every candidate ties
    layer_of = np.array([1, -1, 0, 1, 0], dtype=np.int64)  # [S] slot 1 empty
    expert_of = np.array([2, -1, 1, 0, 0], dtype=np.int64)
    evictable = np.array([False, False, True, True, True])  # slot 0 pinned or loading
    # activation-aware: layer 1 computes now, so layer 1 is needed last and goes first; ties by slot
    assert eviction_order_slots(pred, layer_of, expert_of, evictable, 1, 5, 1e-3).tolist() == [3, 2, 4]
    assert eviction_order_slots(pred, layer_of, expert_of, evictable, 1, 0, 1e-3).tolist() == []
    # recency/frequency: (first, second, layer, expert), whatever slot a key sits in
    first = np.zeros((2, 3), dtype=np.int64)
    second = np.array([[3, 3, 0], [3, 3, 3]], dtype=np.int64)
    assert lowest_slot(first, second, layer_of, expert_of, evictable) == 4  # (0, 0) before (0, 1) and (1, 0)
    second[1, 0] = 2
    assert lowest_slot(first, second, layer_of, expert_of, evictable) == 3
    assert lowest_slot(first, second, layer_of, expert_of, np.zeros(5, dtype=bool)) == -1
