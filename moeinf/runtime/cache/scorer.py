"""The activation-aware scorer: which experts to fetch ahead of need, and which to evict.

It runs at every MoE layer of every step, so it must cost microseconds, not a sort: both orders
are partial selections (a fixed-size heap of the n best, n small) compiled by Numba. The numpy
versions below compute the same orders with a full sort; tests hold the two equal, and
bench/scorer.py times them side by side.

Priorities, for predicted activations pred [L, E] (each row a probability over experts) while
layer l computes:

- prefetch: pred[i, e] * (1 - d / L), d = (i - l) mod L, for the `horizon` layers ahead of l
  (d = 1 .. horizon); nearer layers are more urgent (they have less time for their copy). The
  layers "ahead" wrap past the last layer to the first: in decode, the next step's layer 0
  follows the last layer. Experts predicted below a floor (the policy's: see
  activation_aware.py) are never prefetched.
- eviction: (pred[i, e] + eps) * (1 - d / L), d = (i - l - 1) mod L the number of layers that
  run before layer i runs again; the lowest is evicted first. With l = -1 (nothing computed yet)
  d = i and this is MoE-Infinity's (pred + eps) * (1 - i / L): early layers are kept because
  they have the least time to be prefetched. Measuring from the current layer keeps that
  reasoning true in the middle of a decode step, where the layer needed next is l + 1 and the
  one needed last is l itself (on the Mixtral traces, 34.1% of accesses hit at 64 slots with
  the distance from l against 29.5% with 1 - i / L; see bench/results/policy.md).

Ties go to the entry met first: for prefetch the nearer layer, then the lower expert; for
eviction the earlier candidate.

Victims are chosen over the residency's slot arrays (runtime/cache/residency.py: layer_of, expert_of
[S] and the evictable mask [S]), which it keeps up to date as slots change state, so choosing one
is a single compiled pass over the slots, with no per-candidate Python: eviction_order_slots for
the activation-aware priority (candidates in slot order), lowest_slot for the recency/frequency
baselines (policy.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _offer(keys, ids, size, n, key, idx):
    """Keeps the n largest keys seen so far in a min-heap keys[:size] (root: the worst kept).
    Entries arrive in tie-break order, so an equal key never displaces a kept one. Returns the
    new size."""
    if size < n:
        pos = size
        size += 1
        while pos > 0:  # sift up
            parent = (pos - 1) // 2
            if keys[parent] < key or (keys[parent] == key and ids[parent] > idx):
                break
            keys[pos] = keys[parent]
            ids[pos] = ids[parent]
            pos = parent
        keys[pos] = key
        ids[pos] = idx
        return size
    if not key > keys[0]:
        return size
    pos = 0
    while True:  # sift down from the root, which the new entry replaces
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and (
            keys[child + 1] < keys[child] or (keys[child + 1] == keys[child] and ids[child + 1] > ids[child])
        ):
            child += 1
        if key < keys[child] or (key == keys[child] and idx > ids[child]):
            break
        keys[pos] = keys[child]
        ids[pos] = ids[child]
        pos = child
    keys[pos] = key
    ids[pos] = idx
    return size


@njit(cache=True)
def _best_first(keys, ids, size):
    """The kept entries ordered best first (key descending, then arrival); size is small."""
    for a in range(1, size):
        key, idx = keys[a], ids[a]
        b = a - 1
        while b >= 0 and (keys[b] < key or (keys[b] == key and ids[b] > idx)):
            keys[b + 1] = keys[b]
            ids[b + 1] = ids[b]
            b -= 1
        keys[b + 1] = key
        ids[b + 1] = idx
    return ids[:size].copy()


@njit(cache=True)
def prefetch_order(pred, layer, horizon, n, min_pred):
    """pred: [L, E] float64. The n most urgent (layer, expert) of the `horizon` layers after
    `layer`, as flat indices i * E + e, most urgent first; entries of priority 0, or predicted
    below min_pred, are left out. Returns int64 [m], m <= n."""
    L, E = pred.shape
    keys = np.empty(max(n, 1), np.float64)
    ids = np.empty(max(n, 1), np.int64)
    if n <= 0:
        return ids[:0].copy()
    size = 0
    floor = 0.0  # a key must beat this to enter: 0, then the worst kept once n are kept
    for d in range(1, min(horizon, L - 1) + 1):
        i = (layer + d) % L
        weight = 1.0 - d / L
        for e in range(E):
            key = pred[i, e] * weight
            if key > floor and pred[i, e] >= min_pred:
                size = _offer(keys, ids, size, n, key, (d - 1) * E + e)  # id: arrival order
                if size == n:
                    floor = keys[0]
    ranked = _best_first(keys, ids, size)
    out = np.empty(size, np.int64)
    for r in range(size):  # arrival order -> flat index
        d = ranked[r] // E + 1
        out[r] = ((layer + d) % L) * E + ranked[r] % E
    return out


@njit(cache=True)
def eviction_order_slots(pred, layer_of, expert_of, evictable, layer, n, eps):
    """pred: [L, E] float64; layer_of, expert_of: [S] int64 the (layer, expert) each slot holds;
    evictable: [S] bool the candidates. The n candidate slots of lowest eviction priority, lowest
    first (ties: the lower slot). Returns int64 [min(n, candidates)]."""
    L = pred.shape[0]
    S = evictable.shape[0]
    keys = np.empty(max(n, 1), np.float64)
    ids = np.empty(max(n, 1), np.int64)
    if n <= 0:
        return ids[:0].copy()
    weight = np.empty(L, np.float64)  # [L] 1 - d / L by layer: no division in the loop below
    for i in range(L):
        weight[i] = 1.0 - ((i - layer - 1) % L) / L
    size = 0
    floor = -np.inf
    for c in range(S):
        if not evictable[c]:
            continue
        i = layer_of[c]
        key = -((pred[i, expert_of[c]] + eps) * weight[i])  # the largest key is the lowest priority
        if key > floor:
            size = _offer(keys, ids, size, n, key, c)
            if size == n:
                floor = keys[0]
    return _best_first(keys, ids, size)


@njit(cache=True)
def lowest_slot(first, second, layer_of, expert_of, evictable):
    """first, second: [L, E] int64 per-expert keys; layer_of, expert_of: [S] int64 the (layer,
    expert) each slot holds; evictable: [S] bool the candidates. The candidate slot whose
    (first[l, e], second[l, e], l, e) is smallest: a key is in one slot at most, so the order
    of the slots never decides. Returns -1 when there is no candidate."""
    best = -1
    bf = bs = bl = be = 0
    for c in range(evictable.shape[0]):
        if not evictable[c]:
            continue
        i, e = layer_of[c], expert_of[c]
        f, s = first[i, e], second[i, e]
        if best < 0 or (f, s, i, e) < (bf, bs, bl, be):
            best, bf, bs, bl, be = c, f, s, i, e
    return best


def prefetch_order_ref(pred: np.ndarray, layer: int, horizon: int, n: int, min_pred: float) -> np.ndarray:
    """numpy version of prefetch_order (a full stable sort): same result."""
    L, E = pred.shape
    d = np.arange(1, min(horizon, L - 1) + 1)  # [H]
    rows = (layer + d) % L
    keys = (pred[rows] * (1.0 - d / L)[:, None]).reshape(-1)  # [H * E], arrival order
    flat = (rows[:, None] * E + np.arange(E)).reshape(-1)
    wanted = (keys > 0.0) & (pred[rows].reshape(-1) >= min_pred)  # [H * E]
    order = np.argsort(-keys, kind="stable")
    order = order[wanted[order]][: max(n, 0)]
    return flat[order].astype(np.int64)


def eviction_order_ref(pred: np.ndarray, keys_in: np.ndarray, layer: int, n: int, eps: float) -> np.ndarray:
    """numpy version of eviction_order (a full stable sort): same result."""
    L = pred.shape[0]
    i, e = keys_in[:, 0], keys_in[:, 1]
    keys = -((pred[i, e] + eps) * (1.0 - ((i - layer - 1) % L) / L))
    return np.argsort(-keys, kind="stable")[: max(n, 0)].astype(np.int64)


def eviction_order_slots_ref(
    pred: np.ndarray, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray, layer: int, n: int, eps: float
) -> np.ndarray:
    """numpy version of eviction_order_slots (a full stable sort): same result."""
    slots = np.flatnonzero(evictable)  # [C] candidates in slot order
    keys_in = np.stack([layer_of[slots], expert_of[slots]], axis=1)  # [C, 2]
    return slots[eviction_order_ref(pred, keys_in, layer, n, eps)].astype(np.int64)


def lowest_slot_ref(
    first: np.ndarray, second: np.ndarray, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray
) -> int:
    """numpy version of lowest_slot (a lexicographic sort): same result."""
    slots = np.flatnonzero(evictable)  # [C]
    if len(slots) == 0:
        return -1
    i, e = layer_of[slots], expert_of[slots]
    return int(slots[np.lexsort((e, i, second[i, e], first[i, e]))[0]])
