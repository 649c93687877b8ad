"""How a routed expert turns its gate and up projections into the input of its down projection.

Most families use SwiGLU, silu(gate) * up. GPT-OSS clamps both halves first and adds one to up:
    gate = min(gate, limit); up = clamp(up, -limit, limit)
    act  = (up + 1) * gate * sigmoid(alpha * gate)
The kernels take an ExpertActivation and compile its kind in as a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATION_KINDS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertActivation:
    kind: str = "silu"  # one of ACTIVATION_KINDS
    alpha: float = 1.702  # clamped_swiglu: the sigmoid's gain
    limit: float = 7.0  # clamped_swiglu: the clamp bound

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"expert activation: expected one of {', '.join(ACTIVATION_KINDS)}, found {self.kind!r}")
        if self.kind == "clamped_swiglu" and not (self.alpha > 0 and self.limit > 0):
            raise ValueError(
                f"clamped_swiglu: expected alpha > 0 and limit > 0, found alpha={self.alpha}, limit={self.limit}"
            )

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up: [..., F] -> [..., F], in their dtype (the torch reference formula)."""
        if self.kind == "silu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SILU = ExpertActivation()
