"""Residency bookkeeping of the device expert pool: which expert each slot holds, which slots are
loading, which are pinned by the layer computing now. Plain Python and numpy, no tensors: the cache
controller drives it on the executor's thread, and in trace replay without a model.

The evictable set (READY, unpinned slots) is kept as slots change state, not found by a scan at
each eviction: an eviction at DeepSeek-V3's shape (58 x 256 experts, a quarter resident, ~3700
slots) would otherwise build ~3700 tuples in Python per victim. It lives in numpy arrays over the
slots, so a policy scores every candidate in one compiled pass (see CachePolicy.victim_slot):

    layer_of  [S] int64  layer of the expert in each slot (-1: empty)
    expert_of [S] int64  that expert's index in its layer (-1: empty)
    evictable [S] bool   READY and unpinned

The arrays the policies see are read-only views; only the methods below write them.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

Key = tuple[int, int]  # (layer, expert)


class ResidencyError(RuntimeError):
    """A slot was driven through a transition its state does not allow (a bug in the caller)."""


class SlotState(IntEnum):
    EMPTY = 0
    LOADING = 1  # a copy into the slot is queued or running
    READY = 2


class Residency:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        # Read these freely; change them only through the methods, which keep the arrays in step.
        self.key_in: list[Key | None] = [None] * num_slots
        self.state = [SlotState.EMPTY] * num_slots
        self.pins = [0] * num_slots
        self.slot_of: dict[Key, int] = {}
        self.prefetched: set[Key] = set()  # loaded ahead of need and not used since
        self._free = list(range(num_slots - 1, -1, -1))  # stack: lowest slot first
        self._loading: set[int] = set()  # slots in LOADING
        self._ready = 0  # slots in READY
        self._layer_of = np.full(num_slots, -1, np.int64)  # [S]
        self._expert_of = np.full(num_slots, -1, np.int64)  # [S]
        self._evictable = np.zeros(num_slots, np.bool_)  # [S]
        self._evictable_count = 0
        self.layer_of = _read_only(self._layer_of)  # [S] views the policies read
        self.expert_of = _read_only(self._expert_of)
        self.evictable_mask = _read_only(self._evictable)

    def slot(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def free_slot(self) -> int | None:
        return self._free[-1] if self._free else None

    @property
    def evictable_count(self) -> int:
        """How many slots are READY and unpinned."""
        return self._evictable_count

    def loading(self) -> list[int]:
        """Slots in LOADING, lowest first."""
        return sorted(self._loading)

    def any_loading(self) -> bool:
        """Whether any load is in flight (the link is busy)."""
        return bool(self._loading)

    def assign(self, key: Key, slot: int) -> None:
        """An empty slot starts loading `key`."""
        if self.state[slot] != SlotState.EMPTY or key in self.slot_of:
            raise ResidencyError(
                f"assign({key}, slot {slot}): expected an empty slot and a key held nowhere, found the slot "
                f"{self.state[slot].name} and the key in slot {self.slot_of.get(key)}"
            )
        if self._free[-1] == slot:  # the usual case: the slot free_slot() or evict() just gave out
            self._free.pop()
        else:
            self._free.remove(slot)
        self.key_in[slot] = key
        self.state[slot] = SlotState.LOADING
        self.slot_of[key] = slot
        self._loading.add(slot)
        self._layer_of[slot], self._expert_of[slot] = key

    def mark_ready(self, slot: int) -> None:
        if self.state[slot] != SlotState.LOADING:
            raise ResidencyError(f"mark_ready(slot {slot}): expected a LOADING slot, found {self.state[slot].name}")
        self.state[slot] = SlotState.READY
        self._loading.discard(slot)
        self._ready += 1
        if self.pins[slot] == 0:
            self._set_evictable(slot, True)

    def evict(self, key: Key) -> int:
        """Drops `key` (unpinned, READY or still LOADING); returns the slot it freed."""
        slot = self.slot_of.get(key)
        if slot is None or self.pins[slot]:
            raise ResidencyError(
                f"evict({key}): expected a resident, unpinned key, found "
                + ("it nowhere" if slot is None else f"slot {slot} pinned {self.pins[slot]} times")
            )
        del self.slot_of[key]
        if self.state[slot] == SlotState.READY:
            self._ready -= 1
            self._set_evictable(slot, False)
        self._loading.discard(slot)
        self.key_in[slot] = None
        self.state[slot] = SlotState.EMPTY
        self._layer_of[slot] = self._expert_of[slot] = -1
        self.prefetched.discard(key)
        self._free.append(slot)
        return slot

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        if self._evictable[slot]:
            self._set_evictable(slot, False)

    def unpin(self, slot: int) -> None:
        if self.pins[slot] <= 0:
            raise ResidencyError(f"unpin(slot {slot}): expected a pinned slot, found it unpinned")
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and self.state[slot] == SlotState.READY:
            self._set_evictable(slot, True)

    def unpin_all(self, slot: int) -> None:
        """Drops every pin on `slot` (its load failed and it is about to be evicted)."""
        self.pins[slot] = 0
        if self.state[slot] == SlotState.READY and not self._evictable[slot]:
            self._set_evictable(slot, True)

    def resident(self) -> int:
        """Slots in READY."""
        return self._ready

    def _set_evictable(self, slot: int, value: bool) -> None:
        self._evictable[slot] = value
        self._evictable_count += 1 if value else -1


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view of `array` that follows its writes but refuses its own."""
    view = array.view()
    view.flags.writeable = False
    return view
