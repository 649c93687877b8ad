"""The cache's questions asked with (layer, expert) keys, as tests write them: the package asks
them over the residency's slot arrays only (layer_of, expert_of [S] and the evictable mask [S])."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeinf.runtime.cache.policy import CachePolicy
from moeinf.runtime.cache.residency import Key, Residency
from moeinf.runtime.cache.scorer import eviction_order_slots


def slot_arrays(candidates: Sequence[Key]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pool holding just `candidates`, one per slot in order, all evictable: layer_of,
    expert_of [C] int64 and evictable [C] bool, read-only as the residency hands them over."""
    keys = np.array(candidates, dtype=np.int64).reshape(-1, 2)  # [C, 2] (layer, expert)
    arrays = keys[:, 0].copy(), keys[:, 1].copy(), np.ones(len(candidates), np.bool_)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def victim(policy: CachePolicy, candidates: Sequence[Key]) -> Key:
    """Which of `candidates` (resident, unpinned keys, in slot order) `policy` evicts."""
    return candidates[policy.victim_slot(*slot_arrays(candidates))]


def evictable_keys(residency: Residency) -> list[Key]:
    """Keys in READY, unpinned slots, by slot."""
    return [residency.key_in[slot] for slot in np.flatnonzero(residency.evictable_mask).tolist()]


def eviction_order(pred: np.ndarray, keys_in: np.ndarray, layer: int, n: int, eps: float) -> np.ndarray:
    """pred: [L, E]; keys_in: [C, 2] candidate (layer, expert) pairs. Positions into keys_in of the n
    candidates of lowest eviction priority, lowest first: eviction_order_slots over a pool of them."""
    keys_in = np.asarray(keys_in, dtype=np.int64).reshape(-1, 2)
    every = np.ones(len(keys_in), np.bool_)  # [C]
    return eviction_order_slots(pred, keys_in[:, 0].copy(), keys_in[:, 1].copy(), every, layer, n, eps)
