"""Where a missing expert is computed: fetched over the link into a device slot, or on the host,
where its weights already are. Pure decisions over measured or modelled costs; the cache
controller asks, per miss, and marks the expert HOST in the layer's slot table.

Why: one Mixtral expert holds a PCIe 4 link 14 ms, while a host with DDR4 reads it in 3.5 ms; for
a decode step's few tokens per expert computing it where it sits wins, and the link stays free
for promotions (the policy's picks, loaded at prefetch priority). Prefill-sized token counts turn
it round: device FLOPs beat the host's, so fetching wins there.

Modes (LLM(host_compute=...), replay's placements):
  never   every miss is fetched (MoE-Infinity's, and this runtime's, behaviour before hybrid)
  always  every miss is computed on the host
  auto    per miss, the cheaper of host_s(tokens) and load_s + device_s(tokens)
With `promote`, while the link is idle, one of a layer's host-computed misses (the policy's pick,
CachePolicy.promotion) is loaded into a device slot at prefetch priority for later steps; the
policy's prefetch victim decides whether it is worth one. `device_layers` (static split)
keeps the experts of layers below it on the device, fetched on first use, and computes every other
layer's on the host: llama.cpp's --n-cpu-moe.

Units: seconds, bytes, bytes per second, FLOPs per second.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST = -2  # the slot table's entry for an expert computed on the host this layer (-1: no tokens)
HOST_COMPUTE_CHOICES = ("auto", "never", "always")


@dataclass(frozen=True)
class ExpertCosts:
    """What one routed expert costs where: read from memory at the place's bandwidth, or computed
    at its FLOP rate, whichever binds; a load holds the link for expert_bytes / link_bytes_per_s."""

    expert_bytes: int
    flops_per_token: float  # 2 * the expert's parameters
    link_bytes_per_s: float
    host_bytes_per_s: float
    host_flops_per_s: float
    device_bytes_per_s: float
    device_flops_per_s: float

    def load_s(self) -> float:
        return self.expert_bytes / self.link_bytes_per_s

    def host_s(self, tokens: int) -> float:
        return max(self.expert_bytes / self.host_bytes_per_s, tokens * self.flops_per_token / self.host_flops_per_s)

    def device_s(self, tokens: int) -> float:
        return max(self.expert_bytes / self.device_bytes_per_s, tokens * self.flops_per_token / self.device_flops_per_s)


class Placement:
    """Decides, per miss, host or fetch (see the module docstring)."""

    def __init__(
        self, mode: str, costs: ExpertCosts | None = None, promote: bool = True, device_layers: int | None = None
    ):
        if mode not in HOST_COMPUTE_CHOICES:
            raise ValueError(f"host_compute: expected one of {', '.join(HOST_COMPUTE_CHOICES)}, found {mode!r}")
        if mode == "auto" and costs is None:
            raise ValueError("host_compute 'auto': expected the expert costs it decides by, found none")
        self.mode, self.costs, self.promote, self.device_layers = mode, costs, promote, device_layers

    def __repr__(self) -> str:
        split = "" if self.device_layers is None else f", device_layers={self.device_layers}"
        return f"Placement({self.mode!r}, promote={self.promote}{split})"

    def on_host(self, layer: int, tokens: int) -> bool:
        """Whether a miss of `layer` routed `tokens` tokens is computed on the host."""
        if self.device_layers is not None:
            return layer >= self.device_layers
        if self.mode == "never":
            return False
        if self.mode == "always":
            return True
        c = self.costs
        return c.host_s(tokens) <= c.load_s() + c.device_s(tokens)
