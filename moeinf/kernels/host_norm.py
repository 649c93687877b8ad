"""The residual add and the RMSNorm after it, in one call on the host (CPU), for decode steps.

A decode step's norms are a few thousand elements each: torch runs the reference
(rms_norm_reference: upcast, square, mean, add, rsqrt, two products, a cast) as seven ops of
~10 us of dispatch each, around 17 times a token. Here one compiled call does h += y and returns
rms_norm(h): the reference's arithmetic in float32, the sum of squares in another (vectorised)
order, so float32 outputs agree with it to ~1e-7 relative. bfloat16 tensors (kernels/bf16_bits.py)
round where the reference's do: the residual sum, the normalised row (unless the family scales it
in float32 first, GPT-OSS) and its product with the weight; the other summation order moves the
float32 scale by an ulp now and then, which changes an output only where the product lands within
that of a bfloat16 rounding boundary (an element in a few thousand, by one ulp; once in a tiny
random model's prefill, which moved its logits by 3e-3). So bfloat16 takes this kernel only for
decode proper, one new token per sequence; its prefills keep the reference, whose logits match
transformers' bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from moeinf.kernels.bf16_bits import as_numpy, as_tensor, empty_like_elements, narrow, rounded, widen

DTYPES = (torch.float32, torch.bfloat16)
MAX_TOKENS = 32  # rows a call is meant for (decode); larger steps run the reference
FAST = {"reassoc", "contract"}  # vectorised sums and fused multiply-adds; NaN and infinity kept


@njit(fastmath=FAST, inline="always")
def _write_normed(h, t, squares, weight, eps, bf16, scale_in_fp32, out):
    """out[t] = weight * h[t] * rsqrt(squares / D + eps), squares: the sum of h[t]'s squares."""
    D = h.shape[1]
    scale = np.float32(1.0) / np.sqrt(squares / np.float32(D) + eps)
    for d in range(D):
        normed = widen(h[t, d]) * scale
        if not scale_in_fp32:  # the normalised row is rounded before the weight scales it
            normed = rounded(normed, bf16)
        out[t, d] = narrow(widen(weight[d]) * normed, out[t, d])


@njit(fastmath=FAST, cache=True)
def add_rms_norm_rows(h, y, weight, eps, bf16, scale_in_fp32, out):
    """h [T, D] += y [T, D] in place; out [T, D] = weight * h * rsqrt(mean(h^2) + eps); float32
    arrays, or bfloat16 bits (uint16) with bf16 set."""
    T, D = h.shape
    for t in range(T):
        squares = np.float32(0.0)
        for d in range(D):
            value = rounded(widen(h[t, d]) + widen(y[t, d]), bf16)
            h[t, d] = narrow(value, h[t, d])
            squares += value * value
        _write_normed(h, t, squares, weight, eps, bf16, scale_in_fp32, out)


@njit(fastmath=FAST, cache=True)
def rms_norm_rows(h, weight, eps, bf16, scale_in_fp32, out):
    """out [T, D] = weight * h * rsqrt(mean(h^2) + eps), as add_rms_norm_rows without the add."""
    T, D = h.shape
    for t in range(T):
        squares = np.float32(0.0)
        for d in range(D):
            value = widen(h[t, d])
            squares += value * value
        _write_normed(h, t, squares, weight, eps, bf16, scale_in_fp32, out)


def applies(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, most_new_tokens: int) -> bool:
    """CPU float32 tensors of a decode-sized step, or bfloat16 ones of a decode step proper (at most
    one new token per sequence: most_new_tokens, the most any sequence of the step brings), all of
    one dtype, h and y contiguous rows alike."""
    return (
        h.device.type == "cpu"
        and h.dtype in DTYPES
        and h.dtype == y.dtype == weight.dtype
        and h.shape == y.shape
        and h.shape[0] <= MAX_TOKENS
        and (h.dtype == torch.float32 or most_new_tokens == 1)
        and h.is_contiguous()
        and y.is_contiguous()
        and weight.is_contiguous()
    )


def add_rms_norm(
    h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, scale_in_fp32: bool = False
) -> torch.Tensor:
    """h: [T, D] += y [T, D], in place; returns the RMSNorm of the new h with weight [D], [T, D].
    scale_in_fp32: the weight scales the float32 rows before the one rounding (GPT-OSS)."""
    if not applies(h, y, weight, 1):
        raise ValueError(
            f"host add_rms_norm: expected contiguous CPU float32 or bfloat16 h, y and weight of one dtype, h and y "
            f"[<= {MAX_TOKENS}, D], found h {h.dtype} {list(h.shape)}, y {y.dtype} {list(y.shape)}, weight {weight.dtype}"
        )
    return add_rms_norm_unchecked(h, y, weight, eps, scale_in_fp32)


def add_rms_norm_unchecked(
    h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, scale_in_fp32: bool = False
) -> torch.Tensor:
    """add_rms_norm for inputs `applies` has accepted (a decode step calls it ~17 times: the checks
    once, not twice)."""
    out = empty_like_elements(tuple(h.shape), h.dtype)
    bf16 = h.dtype == torch.bfloat16
    add_rms_norm_rows(as_numpy(h), as_numpy(y), as_numpy(weight), np.float32(eps), bf16, scale_in_fp32, out)
    return as_tensor(out)
