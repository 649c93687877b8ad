"""Activation-aware caching (MoE-Infinity, arXiv 2401.14361) and next-layer router lookahead.

The activation-aware policy predicts, for every layer, how likely each expert is to be routed to
next, and lets the scorer (scorer.py) turn that prediction into prefetches (most urgent first)
and victims (lowest priority first). The prediction mixes two sources, each row normalised to
probabilities:

- the running batch's own EAM, older steps decayed: it carries in-sequence reuse (the experts a
  sequence used lately are the likeliest it uses again);
- the EAMC's best match: the past sequences whose EAMs are most similar to the running one
  (cosine over the layers routed so far), which say what sequences like this one went on to
  route, before the running one has routed enough to say it itself.

    pred[l] = (recent[l] + PRIOR_WEIGHT * prior[l]) / (sum(recent[l]) + PRIOR_WEIGHT)

prior[l] is the EAMC match (uniform while there is none). The match counts as PRIOR_WEIGHT
routings of evidence, so it leads for a sequence's first few tokens and the sequence's own
counts lead after (decayed at DECAY 0.95 and top-2, they level off at 40 routings: weight 0.83).

Prefetches: the lookahead's experts of the next layer when it is given, then the next layer's
likeliest expert, but only if the coming step is more likely than not to use it (MIN_USE: a wrong
prefetch holds a link-bound copy engine while misses wait). Victims: the lowest (pred + eps) x
(1 - distance / L), distance the layers that run before the expert's layer runs again, so the
layers needed soonest are kept; a prefetch never evicts an expert the last step used (the
working-set guard: a miss is not traded for a guess). Promotions (hybrid placement): the
host-computed expert predicted likeliest, and only over a victim predicted less likely. How each constant was chosen, and what it
bought on the shared Mixtral traces, is in bench/results/policy.md ("How the activation-aware
constants were chosen").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeinf.errors import OffloadConfigError
from moeinf.runtime.cache.eam_collection import EAMCollection
from moeinf.runtime.cache.policy import CachePolicy
from moeinf.runtime.cache.residency import Key
from moeinf.runtime.cache.scorer import eviction_order_slots, prefetch_order

DECAY = 0.95  # weight of a step's routing after each later step
PRIOR_WEIGHT = 8.0  # routings of evidence the prior (EAMC match, or uniform) counts for
MATCHES = 1  # EAMC members mixed into the prior
PREFETCH = 1  # predicted experts prefetched per layer, at most
MIN_USE = 0.5  # ... and only those the coming step is at least this likely to use (see below)
HORIZON = 1  # layers ahead they are chosen from
EPS = 1e-3  # an expert predicted at 0 still ranks by its layer's distance
CAPACITY = 128  # EAMC members when the policy builds its own collection
NEVER = np.iinfo(np.int64).min // 2  # last_use of an expert not yet used


class ActivationAwarePolicy(CachePolicy):
    """Prefetches the most urgent predicted experts of the next layers and evicts the resident
    expert of lowest eviction priority. `eamc` is shared, not copied: save it to keep what the
    policy learned (policy.eamc.save(path)); load one to start warm."""

    name = "activation-aware"

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        eamc: EAMCollection | None = None,
        *,
        decay: float = DECAY,
        prior_weight: float = PRIOR_WEIGHT,
        matches: int = MATCHES,
        prefetch: int = PREFETCH,
        horizon: int = HORIZON,
        eps: float = EPS,
        min_use: float = MIN_USE,
        guard: bool = True,
    ):
        super().__init__(num_layers, num_experts)
        if eamc is None:
            eamc = EAMCollection(num_layers, num_experts, CAPACITY)
        if (eamc.num_layers, eamc.num_experts) != (num_layers, num_experts):
            raise OffloadConfigError(
                f"EAMC: expected one for {num_layers} layers x {num_experts} experts, "
                f"found {eamc.num_layers} x {eamc.num_experts}"
            )
        if not 0.0 < decay <= 1.0:
            raise OffloadConfigError(f"decay: expected a value in (0, 1], found {decay!r}")
        if not prior_weight > 0.0:  # a prior is always there: a layer not routed yet still has a prediction
            raise OffloadConfigError(f"prior_weight: expected a value > 0, found {prior_weight!r}")
        if not eps >= 0.0:
            raise OffloadConfigError(f"eps: expected a value >= 0, found {eps!r}")
        if not 0.0 <= min_use <= 1.0:
            raise OffloadConfigError(f"min_use: expected a probability in [0, 1], found {min_use!r}")
        for what, value in (("matches", matches), ("prefetch", prefetch), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OffloadConfigError(f"{what}: expected an integer >= 0, found {value!r}")
        self.eamc = eamc
        self.decay, self.prior_weight, self.matches = float(decay), float(prior_weight), matches
        self.prefetch_count, self.horizon, self.eps, self.min_use = prefetch, horizon, float(eps), float(min_use)
        if not isinstance(guard, bool):
            raise OffloadConfigError(f"guard: expected True or False, found {guard!r}")
        self.guard = guard
        shape = (num_layers, num_experts)
        self.counts = np.zeros(shape)  # [L, E] tokens the running batch routed: matched against the EAMC
        self.recent = np.zeros(shape)  # [L, E] the same, older steps decayed
        self.prior = np.full(shape, 1.0 / num_experts)  # [L, E] the EAMC match, rows normalised
        self.pred = self.prior.copy()  # [L, E] predicted routing, rows normalised
        self.layer = -1  # the layer computing now (-1: none yet in this batch)
        self.routings = 0  # routings (tokens x top-k) the current layer saw in this step
        self.seen = 0  # leading layers the running batch has routed
        self.step = 0  # steps of this batch begun
        self.lookahead_counts: tuple[int, np.ndarray] | None = None  # (layer, [E] counts) foreseen for it
        self.last_use = np.full(shape, NEVER, np.int64)  # [L, E] clock of each expert's last use: the guard

    def begin_batch(self) -> None:
        self.counts[:] = 0.0
        self.recent[:] = 0.0
        self.prior[:] = 1.0 / self.num_experts
        self.pred[:] = self.prior
        self.layer, self.seen, self.step, self.routings = -1, 0, 0, 0
        self.lookahead_counts = None

    def lookahead(self, layer: int, next_counts: Sequence[int]) -> None:
        self.lookahead_counts = (layer + 1, np.asarray(next_counts, dtype=np.float64))

    def observe(self, layer: int, token_counts: Sequence[int]) -> None:
        super().observe(layer, token_counts)
        counts = np.asarray(token_counts, dtype=np.float64)  # [E]
        self.last_use[layer, counts != 0] = self.clock
        if layer == 0:
            self.step += 1
        self.counts[layer] += counts
        self.recent[layer] *= self.decay
        self.recent[layer] += counts
        self.layer = layer
        self.routings = int(counts.sum())
        self.seen = max(self.seen, layer + 1)
        # The match moves most while the batch's first step adds a layer at a time; after that a
        # step changes it little, so it is redone once a step.
        if self.step <= 1 or layer == 0:
            match = self.eamc.predict(self.counts, self.seen, self.matches)
            self.prior[:] = 1.0 / self.num_experts if match is None else match
            self._predict(slice(None))
        else:
            self._predict(slice(layer, layer + 1))

    def _predict(self, rows: slice) -> None:
        recent = self.recent[rows]  # [r, E]
        totals = recent.sum(axis=1, keepdims=True)  # [r, 1]
        self.pred[rows] = (recent + self.prior_weight * self.prior[rows]) / (totals + self.prior_weight)

    def sequence_finished(self, eam: np.ndarray) -> None:
        self.eamc.insert(eam)

    def victim_slot(self, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray) -> int:
        """The candidate of lowest eviction priority; ties go to the lower slot."""
        return int(eviction_order_slots(self.pred, layer_of, expert_of, evictable, self.layer, 1, self.eps)[0])

    def prefetch_victim_slot(self, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray) -> int:
        """The victim a miss would get, unless the last step used it and the working-set guard (see
        the module docstring) is on: then -1, and the prefetch is dropped."""
        slot = self.victim_slot(layer_of, expert_of, evictable)
        if not self.guard:
            return slot
        recently_used = self.last_use[layer_of[slot], expert_of[slot]] > self.clock - self.num_layers
        return -1 if recently_used else slot

    def promotion_victim_slot(
        self, key: Key, layer_of: np.ndarray, expert_of: np.ndarray, evictable: np.ndarray
    ) -> int:
        """A prefetch's victim, but only one predicted to be routed less than `key`: trading an
        expert for one the prediction values no more spends the link for nothing."""
        slot = self.prefetch_victim_slot(layer_of, expert_of, evictable)
        if slot == -1 or self.pred[key] > self.pred[layer_of[slot], expert_of[slot]]:
            return slot
        return -1

    def promotion(self, layer: int, candidates: Sequence[int], token_counts: Sequence[int]) -> int:
        """The candidate predicted to be routed most (the lowest on ties)."""
        return max(candidates, key=lambda e: self.pred[layer, e])

    def min_pred(self) -> float:
        """The prediction below which an expert is not prefetched: with r routings a step (tokens
        x top-k, as the current layer just saw), an expert predicted at p is used by the step
        with probability 1 - (1 - p)^r, which must reach min_use."""
        return 1.0 - (1.0 - self.min_use) ** (1.0 / max(self.routings, 1))

    def prefetch(self, layer: int) -> list[Key]:
        """The lookahead's experts of layer + 1 (most tokens first), when it was given; then the
        `prefetch` most urgent predicted ones of the next `horizon` layers that pass min_pred()."""
        keys = []
        if self.lookahead_counts is not None and self.lookahead_counts[0] == layer + 1:
            counts = self.lookahead_counts[1]  # [E]
            picked = np.flatnonzero(counts)  # [k] the few experts picked, ascending
            keys = [(layer + 1, int(e)) for e in picked[np.argsort(-counts[picked], kind="stable")]]
        self.lookahead_counts = None
        E = self.num_experts
        for flat in prefetch_order(self.pred, layer, self.horizon, self.prefetch_count, self.min_pred()):
            key = (int(flat) // E, int(flat) % E)
            if key not in keys:
                keys.append(key)
        return keys


class ActivationAwareLookaheadPolicy(ActivationAwarePolicy):
    """Activation-aware, plus the experts layer + 1's router picks from this layer's hidden
    state, prefetched first."""

    name = "activation-aware+lookahead"
    wants_lookahead = True


class LookaheadPolicy(ActivationAwareLookaheadPolicy):
    """Prefetches only what layer + 1's router picks from this layer's hidden state; victims
    by the activation-aware eviction priority. (LRU victims were worse: in a decode step the least
    recently used experts are the next layer's, exactly what the lookahead is about to need; see
    the module docstring.)"""

    name = "lookahead"

    def __init__(self, num_layers: int, num_experts: int, eamc: EAMCollection | None = None, **settings):
        super().__init__(num_layers, num_experts, eamc, **{"prefetch": 0, **settings})
