"""The host tier: a fixed number of expert records in host memory (pinned on CUDA) in front of
the disk store, least recently used out first. Worker threads share it, so every access copies
under the lock: a record is never overwritten while it is being read."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from moeinf.runtime.cache.residency import Key


class HostCache:
    def __init__(self, num_records: int, record_nbytes: int, pinned: bool):
        self.num_records = num_records
        # buffer: [H, record_nbytes] uint8
        self.buffer = torch.empty((num_records, record_nbytes), dtype=torch.uint8, pin_memory=pinned).numpy()
        self._where: OrderedDict[Key, int] = OrderedDict()  # oldest first
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
            slot = self._where.popitem(last=False)[1] if len(self._where) == self.num_records else len(self._where)
            self.buffer[slot] = src[: self.buffer.shape[1]]
            self._where[key] = slot

    def __len__(self) -> int:
        return len(self._where)
