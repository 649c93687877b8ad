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

The constants were chosen by replaying the shared Mixtral-8x7B decode traces (gsm8k: 2 sequences,
244 tokens; humaneval: 1 sequence, 59 tokens; 32 layers, 8 experts, top-2) through the real
CacheController with loads landing at once, sequences in order, the EAMC learning only from
finished sequences. Hit rate = (hits + prefetch hits) / accesses; cells are 32 / 64 / 128 slots,
gsm8k then humaneval.

- Eviction distance measured from the layer computing now (scorer.py), not from layer 0: without
  prefetch 17.6 / 34.1 / 61.0, 19.2 / 37.2 / 62.7 against 15.3 / 29.5 / 54.4, 16.3 / 30.0 / 53.4.
- PREFETCH 1 expert per layer, HORIZON 1 layer ahead (no MIN_USE gate, loads landing at once):
  27.1 / 38.4 / 61.5, 28.6 / 40.3 / 62.4,
  for 1.02 / 0.76 / 0.39 loads per access (LRU 34.3% and 0.66 at 64 slots on gsm8k). Two per
  layer: 45.1% for 0.95 at 64 slots; one from two layers ahead: 36.5% for 0.72 (the nearer
  layer's best guess is the better bet). At 64 slots the one prefetch per layer bought 4.3
  points of hit rate for 0.10 more loads per access: about 2 prefetches in 5 get used. Where
  the link is the bottleneck that traffic costs time: see the note below.
- DECAY 0.95: mean hit rate over the six cells 43.0% against 42.6% without decay, 42.8% at 0.9,
  42.2% at 0.8, 40.3% at 0.6.
- PRIOR_WEIGHT 8, MATCHES 1: the traces cannot tell them apart (means 43.0 to 43.3% from 0.5 to
  1e9; warm-starting the EAMC from the other file moves cells by under 1 point): only gsm8k's
  second sequence has a finished sequence to match, and Mixtral routes close to uniformly. So
  they are set by the reasoning above, and the gain over LRU and LFU on these traces comes from
  the layer-aware eviction and the next-layer prefetch, not from the EAMC.
- Lookahead (no shared trace has it; simulated from the traces' own next-layer routing, each
  expert wrong 20% of the time): victims by this eviction priority hit 84.9% at 64 slots on
  gsm8k against 72.6% with LRU's; letting the lookahead overwrite layer + 1's predicted row cut
  it to 78.9% (a wrong lookahead made the truly needed expert the first victim), so it only adds
  prefetches. Adding the predicted prefetch on top (activation-aware+lookahead): 86.0% for 0.91
  loads per access against 84.9% for 0.82.

Time, and the prefetch gate (MIN_USE). In trace replay over a virtual PCIe 4 link
(runtime/replay/), where each copy holds the link for 14 ms against 0.3 ms of compute per layer,
the ungated PREFETCH 1 made the time per token on gsm8k 888 / 679 / 362 ms (32 / 64 / 128 slots)
against 754 / 604 / 362 with prefetch=0 and LRU's 912 / 603 / 430: three prefetches in four went
unused, and a wrong prefetch delays the misses queued behind it. A prefetch pays in link time only
if the step uses it more likely than not (each used one replaces a miss of the same bytes), so an
expert is prefetched only when 1 - (1 - pred)^r >= MIN_USE, r the step's routings (tokens x
top-k). Raising MIN_USE from 0 to 0.3 / 0.4 / 0.5 gave 880 / 774 / 755 ms at 32 slots and 671 /
615 / 605 at 64 (humaneval alike); at 0.5: 755 / 605 / 362 on gsm8k, 741 / 577 / 347 on
humaneval (LRU 912 / 584 / 413). One token at top-2 needs pred >= 0.29, which Mixtral's near-
uniform routing rarely reaches; a batch of 8 needs 0.04. Lower min_use where copies are cheap
against compute (the link idles): then a likely-unused prefetch costs little.

The working-set guard. With no slot free, a prefetch evicts, and where the cache holds little
more than one step's working set the victim is one the next step likely needs: a miss traded for
a guess. So a prefetch never evicts an expert used within the last step (the last L routed
layers, this one included); it is dropped instead (counted as prefetch_declined; guard=False
turns this off, for links fast enough that an early copy beats a kept expert). On the
built-in default model (8 layers x 8 experts, routing sticky from token to token; a 12-prompt
`moeinf trace`, 1983 tokens, replayed over PCIe 4) at 16 slots, exactly one decode step's
working set, the time per token went from 0.59 to 0.55 ms (LRU: 0.50, its victim is always the
expert the current layer just stopped using), and for activation-aware+lookahead from 1.24 to
0.60 ms. On the synthetic Mixtral workload the lookahead policies went from 822 / 669 / 411 ms to
750 / 620 / 407 (12.5 / 25 / 50%). No cell of bench/results/policy.md got slower by more than
0.1%; the activation-aware policy alone moved by under 0.4% there, as the gate above already
drops most of its prefetches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeinf.errors import OffloadConfigError
from moeinf.runtime.cache.eam_collection import EAMCollection
from moeinf.runtime.cache.policy import CachePolicy, Key
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
