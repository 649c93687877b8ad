"""The virtual link: a LoadMechanism over a virtual clock, serving one load at a time."""

from __future__ import annotations

import heapq
import itertools

from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.cache.mechanism import PREFETCH, URGENT
from moeinf.runtime.cache.residency import Key


class VirtualLink:
    """A LoadMechanism over a virtual clock. The clock is advanced by compute (advance) and by
    waiting on loads (wait, which counts the jump as stall); between those, the link serves its
    queue on its own, one load at a time."""

    def __init__(self, link_bytes_per_s: float, expert_bytes: int, counters: TrafficCounters | None = None):
        if link_bytes_per_s <= 0 or expert_bytes <= 0:
            raise ReplayConfigError(
                f"virtual link: expected positive bandwidth and expert size, found {link_bytes_per_s} B/s "
                f"and {expert_bytes} B"
            )
        self.expert_bytes = expert_bytes
        self.load_s = expert_bytes / link_bytes_per_s
        self.counters = counters if counters is not None else TrafficCounters()
        self.now = 0.0  # the virtual clock, seconds
        self.stall_s = 0.0
        self.bytes = 0
        self.promotions = 0  # prefetches needed before they landed (the controller promotes those)
        self._heap: list[tuple[int, int, int]] = []  # (priority, order, slot); stale entries skipped
        self._queued: dict[int, tuple[int, int]] = {}  # slot -> (priority, order) of its live entry
        self._keys: dict[int, Key] = {}  # slot -> key, for every load not yet reported landed
        self._order = itertools.count()  # FIFO within a priority
        self._busy: tuple[int, float] | None = None  # (slot, lands at) of the load on the link
        self._free_at = 0.0  # when the link finished its last load
        self._landed: dict[int, float] = {}  # slot -> landing time, not yet reported

    # LoadMechanism

    def start_load(self, key: Key, slot: int, urgent: bool) -> None:
        self._serve_until(self.now)
        if slot in self._keys:
            raise RuntimeError(
                f"start_load({key}, slot {slot}): expected an idle slot, found a load of {self._keys[slot]}"
            )
        self._keys[slot] = key
        self._push(slot, URGENT if urgent else PREFETCH)
        self._serve_until(self.now)  # an idle link starts it now

    def promote(self, key: Key, slot: int) -> None:
        self._serve_until(self.now)
        self.promotions += 1
        if self._queued.get(slot, (URGENT,))[0] == PREFETCH:
            self._push(slot, URGENT)

    def try_cancel(self, slot: int) -> bool:
        self._serve_until(self.now)
        if slot not in self._queued:
            return False
        del self._queued[slot]
        del self._keys[slot]
        return True

    def wait(self, slot: int) -> None:
        self._serve_until(self.now)
        if slot not in self._keys:
            raise RuntimeError(f"wait(slot {slot}): expected a load queued, on the link or landed, found none")
        while slot not in self._landed:
            self._serve_until(self._busy[1])
        lands = self._landed.pop(slot)
        del self._keys[slot]
        if lands > self.now:
            self.stall_s += lands - self.now
            self.counters.add(stall_s=lands - self.now)
            self.now = lands

    def finished(self) -> list[int]:
        self._serve_until(self.now)
        done = list(self._landed)
        for slot in done:
            del self._keys[slot]
        self._landed.clear()
        return done

    # the clock

    def advance(self, seconds: float) -> None:
        """Compute runs for `seconds`; the link keeps serving meanwhile."""
        self._serve_until(self.now + seconds)
        self.now += seconds

    def pending(self) -> int:
        """Loads queued or on the link."""
        return len(self._queued) + (self._busy is not None)

    def _push(self, slot: int, priority: int) -> None:
        entry = (priority, next(self._order))
        self._queued[slot] = entry
        heapq.heappush(self._heap, (*entry, slot))

    def _serve_until(self, t: float) -> None:
        """Lands every load that finishes by `t`, starting queued ones as the link frees up. Every
        entry in the queue was queued at or before self.now, so a load starts at the later of the
        link freeing up and now."""
        while True:
            if self._busy is not None:
                slot, lands = self._busy
                if lands > t:
                    return
                self._busy = None
                self._free_at = lands
                self._landed[slot] = lands
                self.bytes += self.expert_bytes
                self.counters.add(bytes_to_device=self.expert_bytes)
            while self._heap and self._queued.get(self._heap[0][2]) != self._heap[0][:2]:
                heapq.heappop(self._heap)  # cancelled, or left behind by a promotion
            if not self._heap:
                return
            _, _, slot = heapq.heappop(self._heap)
            del self._queued[slot]
            self._busy = (slot, max(self._free_at, self.now) + self.load_s)
