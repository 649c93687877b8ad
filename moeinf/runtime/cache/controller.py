"""The decisions of the expert cache, apart from the mechanism that moves bytes, and the one caller
of the cache policy.

A step is told to the controller through four entry points, in this order: begin_batch() when a
batch of sequences starts, then per MoE layer acquire(layer, counts, next_counts) and release(),
and sequence_finished(eam) as sequences end. acquire hands the policy the next layer's guess (if
it wants one) and the layer's routing, pins the resident experts, claims slots for the missing
ones (evicting the policy's victims), asks the policy what to prefetch, cancels prefetches the
layer proved stale, and waits for what the layer needs. With a Placement (placement.py), a miss
may instead be computed on the host: it gets no slot (HOST in the table), the link stays free, and
it may be promoted into a slot at prefetch priority for later steps. Loads themselves go through a
LoadMechanism: the runtime's pool (threads, CuPy streams) or trace replay's virtual link. Both
drive exactly this code, through the same entry points.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.cache.mechanism import LoadMechanism
from moeinf.runtime.cache.placement import HOST, Placement
from moeinf.runtime.cache.policy import CachePolicy
from moeinf.runtime.cache.residency import Key, Residency, SlotState


class PolicyError(RuntimeError):
    """A cache policy answered outside its contract (a victim that is not a candidate)."""


class CacheController:
    def __init__(
        self,
        num_slots: int,
        num_experts: int,
        policy: CachePolicy,
        mechanism: LoadMechanism,
        counters: TrafficCounters,
        placement: Placement | None = None,
    ):
        self.residency = Residency(num_slots)
        self.num_experts = num_experts
        self.policy = policy
        self.mechanism = mechanism
        self.counters = counters
        self.placement = placement  # None: every miss is fetched
        self._pinned: list[int] = []  # slots pinned by the layer computing now
        self._promoted: set[Key] = set()  # promotions not yet needed by any layer

    @property
    def wants_lookahead(self) -> bool:
        """Whether acquire() should be given next_counts (the policy asks for the lookahead)."""
        return self.policy.wants_lookahead

    def begin_batch(self) -> None:
        """A batch of sequences begins at layer 0: no routing state carries over from the last."""
        self.policy.begin_batch()

    def sequence_finished(self, eam: np.ndarray) -> None:
        """A sequence of the batch ended. eam: [L, E] tokens it routed to each expert."""
        self.policy.sequence_finished(eam)

    def acquire(
        self, layer: int, token_counts: Sequence[int], next_counts: Sequence[int] | None = None, allow_host: bool = True
    ) -> list[int]:
        """token_counts: [E] tokens routed to each expert of `layer`; next_counts: [E] tokens that
        layer + 1's router, applied to this layer's hidden state, sends to each of its experts
        (None: not guessed, or no next layer). Returns [E] slots (-1 for experts without tokens,
        HOST for those the placement computes on the host) once every other routed expert is
        resident; they stay pinned until release(). allow_host=False: this step fetches every
        miss whatever the placement says (the runtime's host kernels take decode-sized steps only)."""
        res = self.residency
        needed = [e for e, count in enumerate(token_counts) if count]
        if next_counts is not None and self.policy.wants_lookahead:
            self.policy.lookahead(layer, next_counts)
        self.policy.observe(layer, token_counts)
        for slot in self.mechanism.finished():
            self._landed(slot)
        self._cancel_stale(layer, set(needed))
        missing, on_host = [], []
        for expert in needed:
            key = (layer, expert)
            slot = res.slot(key)
            host = (
                allow_host and self.placement is not None and self.placement.on_host(layer, int(token_counts[expert]))
            )
            if slot is None or (host and res.state[slot] == SlotState.LOADING):
                # a miss, or a prefetch or promotion still on the link: where the placement computes
                # misses on the host, the host computes it now rather than the layer waiting; a load
                # in flight goes on, for later steps
                if host:
                    on_host.append(expert)
                else:
                    missing.append(key)
                continue
            if key in self._promoted:
                self._promoted.discard(key)
                self.counters.add(promotion_hits=1)
                if res.state[slot] == SlotState.LOADING:  # the layer waits on it: on-demand priority now
                    self.mechanism.promote(key, slot)
            if key in res.prefetched:
                res.prefetched.discard(key)
                self.counters.add(prefetch_hits=1)
                if res.state[slot] == SlotState.LOADING:  # late: the layer waits on it, promoted
                    self.counters.add(prefetch_late=1)
                    self.mechanism.promote(key, slot)
            else:
                self.counters.add(hits=1)
            res.pin(slot)
        for key in missing:
            slot = self._claim(key, wait=True)
            res.pin(slot)
            self.mechanism.start_load(key, slot, urgent=True)
        self.counters.add(misses=len(missing), host_computed=len(on_host))
        hybrid = self.placement is not None and self.placement.mode != "never"
        for key in self.policy.prefetch(layer):
            if hybrid and res.any_loading():  # with host compute, only an idle link is worth spending
                break
            self._prefetch(key)
        if on_host and self.placement.promote and not res.any_loading():
            # one promotion at a time, while the link is idle, of the policy's choosing
            self._promote((layer, self.policy.promotion(layer, on_host, token_counts)))
        table = [-1] * self.num_experts
        for expert in on_host:
            table[expert] = HOST
        self._pinned = []
        for expert in needed:
            if table[expert] == HOST:
                continue
            slot = res.slot((layer, expert))
            if res.state[slot] == SlotState.LOADING:
                self._wait(slot)
            table[expert] = slot
            self._pinned.append(slot)
        return table

    def release(self) -> list[int]:
        """Unpins the current layer's slots; returns them."""
        slots, self._pinned = self._pinned, []
        for slot in slots:
            self.residency.unpin(slot)
        return slots

    def _landed(self, slot: int) -> None:
        if self.residency.state[slot] == SlotState.LOADING:
            self.residency.mark_ready(slot)

    def _wait(self, slot: int) -> None:
        try:
            self.mechanism.wait(slot)
        except BaseException:
            key = self.residency.key_in[slot]
            self.residency.unpin_all(slot)
            self.residency.evict(key)
            raise
        self._landed(slot)

    def _cancel_stale(self, layer: int, needed: set[int]) -> None:
        """Prefetches for this layer that it turned out not to need, and that have not started,
        are dropped: their slots are better spent on what the next layers need."""
        res = self.residency
        for key in [k for k in res.prefetched if k[0] == layer and k[1] not in needed]:
            slot = res.slot(key)
            if res.state[slot] == SlotState.LOADING and self.mechanism.try_cancel(slot):
                res.evict(key)
                self.counters.add(prefetch_cancelled=1, prefetch_wasted=1)

    def _claim(self, key: Key, wait: bool, promotion: bool = False) -> int | None:
        """A slot for `key`, evicting the policy's victim if none is free. With wait (a miss),
        blocks on in-flight prefetches when every slot is busy; without (a prefetch or, with
        promotion, a promotion), gives up (returns None) then, or when the policy will not evict
        for it."""
        res = self.residency
        slot = res.free_slot()
        while slot is None:
            if res.evictable_count:
                # the residency keeps the candidates as arrays over the slots: no per-slot Python here
                if promotion:
                    chosen = self.policy.promotion_victim_slot(key, res.layer_of, res.expert_of, res.evictable_mask)
                else:
                    choose = self.policy.victim_slot if wait else self.policy.prefetch_victim_slot
                    chosen = choose(res.layer_of, res.expert_of, res.evictable_mask)
                if chosen == -1 and not wait:
                    return None
                if not (0 <= chosen < res.num_slots and res.evictable_mask[chosen]):
                    raise PolicyError(
                        f"policy {self.policy.name}: expected the slot of an evictable expert as its victim, "
                        f"found slot {chosen!r}"
                    )
                victim = res.key_in[chosen]
                if victim in res.prefetched:
                    self.counters.add(prefetch_wasted=1)
                self._promoted.discard(victim)
                slot = res.evict(victim)
                self.counters.add(evictions=1)
                break
            if not wait:
                return None
            loading = [s for s in res.loading() if res.pins[s] == 0]
            if not loading:
                raise RuntimeError(f"all {res.num_slots} expert slots are pinned; the budget check should prevent this")
            self._wait(loading[0])
        res.assign(key, slot)
        return slot

    def _prefetch(self, key: Key) -> None:
        if self.residency.slot(key) is not None:
            return
        slot = self._claim(key, wait=False)
        if slot is None:
            self.counters.add(prefetch_declined=1)
            return
        self.residency.prefetched.add(key)
        self.counters.add(prefetches=1)
        self.mechanism.start_load(key, slot, urgent=False)

    def _promote(self, key: Key) -> None:
        """A host-computed expert loaded into a slot for later steps, at prefetch priority, if the
        policy gives it one (CachePolicy.promotion_victim_slot: none when it values every candidate
        victim more, or no slot is free to take)."""
        if self.residency.slot(key) is not None:  # already on its way (a prefetch or promotion)
            return
        slot = self._claim(key, wait=False, promotion=True)
        if slot is None:
            return
        self._promoted.add(key)
        self.counters.add(promotions=1)
        self.mechanism.start_load(key, slot, urgent=False)

    def resident_experts(self) -> int:
        return self.residency.resident()
