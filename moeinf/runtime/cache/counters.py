"""Expert traffic counters, shared by the cache controller (decisions) and the pool's I/O
workers (bytes), so they are updated under a lock."""

from __future__ import annotations

import threading

COUNTERS = (
    "hits",  # needed experts already resident (not counting unused prefetches)
    "misses",  # needed experts loaded on demand
    "prefetches",  # prefetch loads issued
    "prefetch_hits",  # needed experts that a prefetch had loaded or was loading
    "prefetch_late",  # the prefetch hits whose load was still in flight when the layer needed it
    "prefetch_wasted",  # prefetched experts evicted or cancelled before any use
    "prefetch_cancelled",  # prefetches dropped before they started
    "prefetch_declined",  # prefetches not issued: no slot free, none the policy would evict for one, or all loading
    "evictions",
    "host_computed",  # needed experts computed on the host where their weights are, not loaded (hybrid)
    "host_s",  # time spent computing experts on the host
    "promotions",  # host-computed experts loaded into a device slot at prefetch priority, for later steps
    "promotion_hits",  # needed experts a promotion had loaded or was loading
    "host_hits",  # loads served from the host tier
    "checksum_failures",  # store records that failed their checksum and were re-read from the checkpoint
    "records_repaired",  # of those, the ones rewritten in the store from the checkpoint's bytes, read back whole
    "bytes_to_device",
    "bytes_from_disk",
    "stall_s",  # time the compute thread waited for loads
)


class TrafficCounters:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(COUNTERS, 0)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)
