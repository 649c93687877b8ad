"""Residency bookkeeping of the device expert pool: which expert each slot holds, which slots are
loading, which are pinned by the layer computing now. Plain Python, no tensors: the pool drives
it on the executor's thread, and trace replay can drive the same code without a model."""

from __future__ import annotations

from enum import IntEnum

Key = tuple[int, int]  # (layer, expert)


class SlotState(IntEnum):
    EMPTY = 0
    LOADING = 1  # a copy into the slot is queued or running
    READY = 2


class Residency:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.key_in: list[Key | None] = [None] * num_slots
        self.state = [SlotState.EMPTY] * num_slots
        self.pins = [0] * num_slots
        self.slot_of: dict[Key, int] = {}
        self.prefetched: set[Key] = set()  # loaded ahead of need and not used since
        self._free = list(range(num_slots - 1, -1, -1))  # stack: lowest slot first

    def slot(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def free_slot(self) -> int | None:
        return self._free[-1] if self._free else None

    def evictable(self) -> list[Key]:
        """Keys in READY, unpinned slots."""
        return [
            key
            for slot, key in enumerate(self.key_in)
            if key is not None and self.state[slot] == SlotState.READY and self.pins[slot] == 0
        ]

    def loading(self) -> list[int]:
        return [slot for slot, state in enumerate(self.state) if state == SlotState.LOADING]

    def assign(self, key: Key, slot: int) -> None:
        """An empty slot starts loading `key`."""
        assert self.state[slot] == SlotState.EMPTY and key not in self.slot_of, (key, slot)
        self._free.remove(slot)
        self.key_in[slot] = key
        self.state[slot] = SlotState.LOADING
        self.slot_of[key] = slot

    def mark_ready(self, slot: int) -> None:
        assert self.state[slot] == SlotState.LOADING, slot
        self.state[slot] = SlotState.READY

    def evict(self, key: Key) -> int:
        """Drops `key` (unpinned); returns the slot it freed."""
        slot = self.slot_of.pop(key)
        assert self.pins[slot] == 0, key
        self.key_in[slot] = None
        self.state[slot] = SlotState.EMPTY
        self.prefetched.discard(key)
        self._free.append(slot)
        return slot

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self.pins[slot] > 0, slot
        self.pins[slot] -= 1

    def resident(self) -> int:
        return sum(state == SlotState.READY for state in self.state)
