"""One sequence's attention for a decode-sized step on the host (CPU), float32, in one call.

torch spends ~35 small ops a layer on what a decode step's attention is (split the qkv projection,
rotate q and k, write k and v into the cache, transpose for SDPA, attend, reshape), ~0.5 ms of
dispatch for a few microseconds of arithmetic. This kernel takes the qkv projection's rows as they
come out of the linear and does all of it: rotary embedding of q and k (Hugging Face's half-split
layout, the first rotary_dim dims of each head), k and v written into the sequence's cache at
their positions, and each query head's causal (optionally sliding-window) softmax over its
group's cached keys, weighted sum of values, in float32. It is the reference's arithmetic
(models/rope.py apply_rope, models/attention.py attend) in another summation order, so outputs
agree with it to ~1e-6 relative; no attention sinks, qk norms or interleaved rope (those families
take the torch path).

Shapes: T new tokens at positions start .. start + T - 1; H query heads, Hkv key/value heads
(H a multiple of Hkv), Dh head dim; C cache capacity.
  qkv [T, H*Dh + 2*Hkv*Dh]: q heads, then k heads, then v heads, as the fused projection lays them
  cos, sin [T, rotary_dim]; k_cache, v_cache [Hkv, C, Dh] (one layer's); out [T, H*Dh]
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

MAX_TOKENS = 32  # new tokens a call is meant for (decode); larger steps run SDPA
FAST = {"reassoc", "contract"}  # vectorised sums and fused multiply-adds; NaN and infinity kept
NO_WINDOW = 0  # the window argument when every earlier position is visible


@njit(fastmath=FAST, inline="always")
def _rotated(row, base, i, cos, sin, t, half, rotary_dim):
    """Element i of the head starting at row[base], after the rotary embedding of token t."""
    if i < half:
        return row[base + i] * cos[t, i] - row[base + i + half] * sin[t, i]
    if i < rotary_dim:
        return row[base + i] * cos[t, i] + row[base + i - half] * sin[t, i]
    return row[base + i]


@njit(fastmath=FAST, cache=True)
def _attend(qkv, cos, sin, k_cache, v_cache, start, window, scale, heads, kv_heads, head_dim, out):
    """Rope and the cache writes serially (a few hundred elements), then the softmax rows in their
    own parallel function: with the writes in the same parallel function its dot products did not
    vectorise (3x slower at 160 cached positions)."""
    T = qkv.shape[0]
    rotary_dim = cos.shape[1]
    half = rotary_dim // 2
    group = heads // kv_heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    for t in range(T):  # the new keys and values into the cache
        row = qkv[t]
        for g in range(kv_heads):
            for i in range(head_dim):
                k_cache[g, start + t, i] = _rotated(row, q_dim + g * head_dim, i, cos, sin, t, half, rotary_dim)
                v_cache[g, start + t, i] = row[q_dim + kv_dim + g * head_dim + i]
    q = np.empty((heads * T, head_dim), np.float32)  # [H*T, Dh] rotated queries, row h * T + t
    for item in range(heads * T):
        h, t = item // T, item % T
        for i in range(head_dim):
            q[item, i] = _rotated(qkv[t], h * head_dim, i, cos, sin, t, half, rotary_dim)
    attended = np.empty((heads * T, head_dim), np.float32)  # [H*T, Dh]
    _softmax_rows(q, k_cache, v_cache, start, T, window, scale, group, attended)
    for item in range(heads * T):
        h, t = item // T, item % T
        out[t, h * head_dim : (h + 1) * head_dim] = attended[item]


@njit(parallel=True, fastmath=FAST, cache=True)
def _softmax_rows(q, k_cache, v_cache, start, T, window, scale, group, out):
    """out[h * T + t] = softmax over the keys query t of head h sees, of q.k * scale, times v.
    q, out: [H*T, Dh]; k_cache, v_cache: [Hkv, C, Dh]. In parallel over (head, token)."""
    rows, head_dim = q.shape
    scores = np.empty((rows, start + T), np.float32)  # [H*T, S]
    for item in prange(rows):
        g = (item // T) // group
        last = start + item % T  # the query's own position: it sees keys first .. last
        first = max(0, last - window + 1) if window > 0 else 0
        peak = np.float32(-np.inf)
        for j in range(first, last + 1):
            s = np.float32(0.0)
            for i in range(head_dim):
                s += q[item, i] * k_cache[g, j, i]
            s *= scale
            scores[item, j] = s
            peak = max(peak, s)
        total = np.float32(0.0)
        for j in range(first, last + 1):
            p = np.exp(scores[item, j] - peak)
            scores[item, j] = p
            total += p
        for i in range(head_dim):
            out[item, i] = 0.0
        for j in range(first, last + 1):
            p = scores[item, j] / total
            for i in range(head_dim):
                out[item, i] += p * v_cache[g, j, i]


def applies(qkv: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """CPU float32 rows of a decode-sized step over a float32 cache."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype == k_cache.dtype == torch.float32
        and qkv.shape[0] <= MAX_TOKENS
        and qkv.stride(-1) == 1
        and k_cache.is_contiguous()
    )


def attend_decode(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    window: int | None,
    scale: float | None,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """See the module docstring for shapes. Writes the T new keys and values into the caches at
    positions start .. start + T - 1; returns the attention output [T, H*Dh] float32.
    window: a query sees only the last `window` positions (its own included), None: all;
    scale: of q.k, None for Dh ** -0.5."""
    T = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    expected = (heads + 2 * kv_heads) * head_dim
    if not applies(qkv, k_cache) or qkv.shape[1] != expected or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"host attention: expected CPU float32 qkv [<= {MAX_TOKENS}, {expected}] and caches "
            f"[{kv_heads}, C, {head_dim}], found qkv {qkv.dtype} {list(qkv.shape)}, k_cache "
            f"{k_cache.dtype} {list(k_cache.shape)}, v_cache {list(v_cache.shape)}"
        )
    if heads % kv_heads or start + T > k_cache.shape[1]:
        raise ValueError(
            f"host attention: expected heads a multiple of kv_heads and positions within the cache's "
            f"{k_cache.shape[1]}, found {heads} heads, {kv_heads} kv heads, positions {start} .. {start + T - 1}"
        )
    out = torch.empty((T, heads * head_dim), dtype=torch.float32)
    _attend(
        qkv.numpy(), cos.float().contiguous().numpy(), sin.float().contiguous().numpy(),
        k_cache.numpy(), v_cache.numpy(), start, NO_WINDOW if window is None else window,
        np.float32(head_dim**-0.5 if scale is None else scale), heads, kv_heads, head_dim, out.numpy(),
    )  # fmt: skip
    return out
