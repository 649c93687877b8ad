"""The dense SwiGLU MLP: dense layers between MoE layers, and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x: [T, D]; w13: [2F, D] gate rows then up rows; w2: [D, F]. Returns [T, D]."""
    gate, up = F.linear(x, w13).split(w2.shape[-1], dim=-1)
    return F.linear(F.silu(gate) * up, w2)
