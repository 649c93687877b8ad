"""The contract between the executor and wherever a MoE layer's routed experts live.

The executor tells its ExpertSource what a step does, and nothing else does: begin_batch() when a
generate call starts, acquire(layer, routing, next_routing) for each MoE layer, release(layer) once
the layer's experts have run, sequence_finished(eam) when a sequence ends. acquire answers with a
LayerExperts: everything the executor needs to compute the layer. Where an offloading policy
decides residency, the source hands each of these to its CacheController, the policy's only caller
(trace replay drives that controller through the same entry points).

Two sources exist: ResidentExperts (every expert in device memory; the calls cost nothing) and
ExpertPool (a fixed number of device slots fed from the host tier and the disk store).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from moeinf.kernels.host_experts import SecondBuffers
from moeinf.kernels.quantize import QuantizedMatrix
from moeinf.runtime.cache.counters import TrafficCounters
from moeinf.runtime.cache.eam import expert_counts
from moeinf.runtime.cache.policy import CachePolicy


class LayerRouting:
    """One MoE layer's routing of a step's T tokens: the experts each token goes to (and their
    weights), on the compute device for the kernels, and on the host, copied once when first asked,
    for whatever counts them (the policy, each sequence's EAM, a recorded trace)."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor | None, num_experts: int):
        self.ids = ids  # [T, K] int64 on the compute device
        self.weights = weights  # [T, K] in the dtype experts are weighed in; None for a guess
        self.num_experts = num_experts
        self._host_ids: np.ndarray | None = None

    def host_ids(self) -> np.ndarray:
        """[T, K] int64 on the host: one device-to-host copy, the first time it is asked for."""
        if self._host_ids is None:
            self._host_ids = self.ids.cpu().numpy()
        return self._host_ids

    def counts(self) -> np.ndarray:
        """[E] int64 tokens routed to each expert (waits for the device)."""
        return expert_counts(self.host_ids(), self.num_experts)

    def device_counts(self) -> torch.Tensor:
        """[E] int64 tokens routed to each expert, on the device, without waiting for it."""
        flat = self.ids.reshape(-1)  # [T*K]
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device)  # [E]
        return counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would wait to size its output


@dataclass
class LayerExperts:
    """What the executor needs to compute one MoE layer's routed experts: the device buffers the
    expert kernels read, and where in them each routed expert of the layer sits."""

    slots: torch.Tensor  # [E] int64 the slot of each expert of the layer (-1: not routed this step)
    w13: torch.Tensor | QuantizedMatrix  # [S, 2F, D] gate and up rows of every slot (float or int8 / int4)
    w2: torch.Tensor | QuantizedMatrix  # [S, D, F] down
    b13: torch.Tensor | None = None  # [S, 2F] for families with expert biases
    b2: torch.Tensor | None = None  # [S, D]
    # the experts computed on the host this layer (hybrid execution): read from the host tier's
    # records instead of the slots (their `slots` entries are -1); None: every routed expert is in a slot
    host: SecondBuffers | None = None
    input_perm: torch.Tensor | None = None  # [S, D] int32 w13's input order (act-order records); None: identity


class ExpertSource(Protocol):
    num_slots: int  # device expert slots
    wants_lookahead: bool  # acquire() wants next_routing: the next MoE layer's routing, guessed
    tracks_routing: bool  # sequence_finished() wants each finished sequence's EAM
    policy: CachePolicy | None  # the offloading policy, for inspection (None: nothing is offloaded)

    @property
    def stats(self) -> TrafficCounters:
        """Expert traffic since the source was built (see cache/counters.py)."""

    def begin_batch(self) -> None:
        """A generate call starts: a new batch of sequences begins at layer 0."""

    def acquire(self, layer: int, routing: LayerRouting, next_routing: LayerRouting | None) -> LayerExperts:
        """MoE layer `layer` (its index among the MoE layers) routes as `routing` says; returns its
        experts, ready for the kernels and kept in place until release(layer). next_routing: what
        layer + 1's router picks from this layer's hidden state, given when wants_lookahead and a
        next MoE layer exists."""

    def release(self, layer: int) -> None:
        """The experts of `layer` have been computed with (their kernels are enqueued)."""

    def sequence_finished(self, eam: np.ndarray) -> None:
        """A sequence of the batch ended. eam: [L, E] tokens it routed to each expert, prefill and
        decode summed (only asked of sources that track routing)."""

    def resident_experts(self) -> int:
        """Experts on the device now."""

    def close(self) -> None:
        """Stops any I/O workers and closes any store."""
