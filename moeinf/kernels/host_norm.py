"""The residual add and the RMSNorm after it, in one call on the host (CPU), for float32 decode steps.

A decode step's norms are a few thousand elements each: torch runs the reference
(rms_norm_reference: upcast, square, mean, add, rsqrt, two products, a cast) as seven ops of
~10 us of dispatch each, around 17 times a token. Here one compiled call does h += y and returns
rms_norm(h): the reference's arithmetic in float32, the sum of squares in another (vectorised)
order, so outputs agree with it to ~1e-7 relative. float32 only: in bfloat16 the reference's
rounding of that sum decides the last bit of the output, which this order would not reproduce.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

MAX_TOKENS = 32  # rows a call is meant for (decode); larger steps run the reference
FAST = {"reassoc", "contract"}  # vectorised sums and fused multiply-adds; NaN and infinity kept


@njit(fastmath=FAST, cache=True)
def _add_rms_norm(h, y, weight, eps, out):
    """h [T, D] += y [T, D] in place; out [T, D] = weight * h * rsqrt(mean(h^2) + eps), float32."""
    T, D = h.shape
    for t in range(T):
        squares = np.float32(0.0)
        for d in range(D):
            value = h[t, d] + y[t, d]
            h[t, d] = value
            squares += value * value
        scale = np.float32(1.0) / np.sqrt(squares / np.float32(D) + eps)
        for d in range(D):
            out[t, d] = weight[d] * (h[t, d] * scale)


def applies(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU float32 tensors of a decode-sized step, h and y contiguous rows alike."""
    return (
        h.device.type == "cpu"
        and h.dtype == y.dtype == weight.dtype == torch.float32
        and h.shape == y.shape
        and h.shape[0] <= MAX_TOKENS
        and h.is_contiguous()
        and y.is_contiguous()
        and weight.is_contiguous()
    )


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h: [T, D] += y [T, D], in place; returns the RMSNorm of the new h with weight [D], [T, D]."""
    if not applies(h, y, weight):
        raise ValueError(
            f"host add_rms_norm: expected contiguous CPU float32 h and y of one shape [<= {MAX_TOKENS}, D] "
            f"and weight [D], found h {h.dtype} {list(h.shape)}, y {y.dtype} {list(y.shape)}, weight {weight.dtype}"
        )
    out = torch.empty_like(h)
    _add_rms_norm(h.numpy(), y.numpy(), weight.numpy(), np.float32(eps), out.numpy())
    return out
