"""The transfer engine's queue: expert loads run on worker threads, on-demand loads before
prefetches, and a prefetch that has not started can be cancelled.

What one load does (read a record from the host tier or the disk store, copy it into a device
slot, on a CuPy stream where there is CUDA) is the `load` callable the pool hands in; this class
only orders and runs the loads. Each ticket is a concurrent.futures.Future.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from typing import Callable

from moeinf.runtime.cache.mechanism import PREFETCH, URGENT
from moeinf.runtime.cache.residency import Key


class TransferQueue:
    def __init__(self, load: Callable[[Key, int], None], workers: int, name: str = "moeinf-io"):
        self._load = load
        self._heap: list[tuple[int, int, Future, Key, int]] = []
        self._order = itertools.count()  # FIFO within a priority
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, key: Key, slot: int, urgent: bool) -> Future:
        ticket: Future = Future()
        self._push(ticket, key, slot, URGENT if urgent else PREFETCH)
        return ticket

    def promote(self, ticket: Future, key: Key, slot: int) -> None:
        """A queued prefetch became needed now: queue it again behind the on-demand loads already
        waiting, ahead of every prefetch. The entry left behind is skipped when a worker reaches it."""
        self._push(ticket, key, slot, URGENT)

    def cancel(self, ticket: Future) -> bool:
        """Cancels a load that has not started; False if it is running or done."""
        with self._cv:
            return ticket.cancel()

    def _push(self, ticket: Future, key: Key, slot: int, priority: int) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("transfer queue is closed")
            heapq.heappush(self._heap, (priority, next(self._order), ticket, key, slot))
            self._cv.notify()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, ticket, key, slot = heapq.heappop(self._heap)
                if ticket.done() or ticket.running() or not ticket.set_running_or_notify_cancel():
                    continue  # cancelled, or a promoted duplicate already taken
            try:
                self._load(key, slot)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the ticket
                ticket.set_exception(e)
            else:
                ticket.set_result(None)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, ticket, _, _ in self._heap:
                ticket.cancel()
            self._heap.clear()
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()
