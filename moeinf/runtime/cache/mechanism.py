"""What the cache controller asks of whatever moves expert bytes (the runtime's ExpertPool, trace
replay's VirtualLink), and the two priorities every transfer queue orders loads by."""

from __future__ import annotations

from typing import Protocol

from moeinf.runtime.cache.residency import Key

URGENT, PREFETCH = 0, 1  # queue priorities, lower runs first: on-demand loads before prefetches


class LoadMechanism(Protocol):
    def start_load(self, key: Key, slot: int, urgent: bool) -> None:
        """Queues a copy of `key` into `slot`; urgent (on-demand) loads go before prefetches."""

    def promote(self, key: Key, slot: int) -> None:
        """A queued prefetch into `slot` is needed now: queue it with the on-demand loads."""

    def try_cancel(self, slot: int) -> bool:
        """Drops the load into `slot` if it has not started."""

    def wait(self, slot: int) -> None:
        """Blocks until the load into `slot` has landed; raises if it failed."""

    def finished(self) -> list[int]:
        """Slots whose loads have landed since the last wait on them (does not block)."""
