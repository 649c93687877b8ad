"""The host tier: a fixed number of expert records in host memory (pinned on CUDA) in front of
the disk store, least recently used out first. Worker threads share it, so every access copies
under the lock: a record is never overwritten while it is being read. Records the host computes
with (hybrid execution) are pinned for their layer: nothing evicts them until unpin_all()."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from moeinf.runtime.cache.residency import Key


class HostCache:
    def __init__(self, num_records: int, record_nbytes: int, pinned: bool):
        self.num_records = num_records
        # buffer: [H, record_nbytes] uint8
        self.buffer = torch.empty((num_records, record_nbytes), dtype=torch.uint8, pin_memory=pinned).numpy()
        self._where: OrderedDict[Key, int] = OrderedDict()  # oldest first
        self._pinned: set[Key] = set()  # records a layer computes with now
        self._unused = list(range(num_records - 1, -1, -1))  # records holding nothing, lowest last
        self._lock = threading.Lock()

    def copy_out(self, key: Key, dst: np.ndarray) -> bool:
        """Copies the record of `key` into dst and returns True, or returns False on a miss."""
        with self._lock:
            slot = self._where.get(key)
            if slot is None:
                return False
            self._where.move_to_end(key)
            dst[: self.buffer.shape[1]] = self.buffer[slot]
            return True

    def copy_in(self, key: Key, src: np.ndarray) -> None:
        if self.num_records == 0:
            return
        with self._lock:
            if key in self._where:
                self._where.move_to_end(key)
                return
            slot = self._free_record()
            if slot is None:  # every record pinned by the computing layer: not cached this time
                return
            self.buffer[slot] = src[: self.buffer.shape[1]]
            self._where[key] = slot

    def pin(self, key: Key, read: Callable[[np.ndarray], None]) -> int | None:
        """The record of `key`, pinned until unpin_all(): where it is, or read into the tier by
        read(row) (row: [record_nbytes] uint8); None when every record is pinned."""
        with self._lock:
            slot = self._where.get(key)
            if slot is None:
                slot = self._free_record()
                if slot is None:
                    return None
                try:
                    read(self.buffer[slot])  # under the lock: no worker copies this record half-read
                except BaseException:
                    self._unused.append(slot)
                    raise
                self._where[key] = slot
            self._where.move_to_end(key)
            self._pinned.add(key)
            return slot

    def unpin_all(self) -> None:
        with self._lock:
            self._pinned.clear()

    def _free_record(self) -> int | None:
        """A record to fill (the caller holds the lock): an unused one, else the least recently
        used unpinned one, forgotten; None when all are pinned."""
        if self._unused:
            return self._unused.pop()
        victim = next((key for key in self._where if key not in self._pinned), None)
        if victim is None:
            return None
        return self._where.pop(victim)

    def __len__(self) -> int:
        return len(self._where)
