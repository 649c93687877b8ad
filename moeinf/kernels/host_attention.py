"""One sequence's attention for a decode-sized step on the host (CPU), float32 or bfloat16, in one call.

torch spends ~35 small ops a layer on what a decode step's attention is (split the qkv projection,
rotate q and k, write k and v into the cache, transpose for SDPA, attend, reshape), ~0.5 ms of
dispatch for a few microseconds of arithmetic (and its bfloat16 SDPA on a CPU without bfloat16
instructions takes ~0.35 ms a layer). This kernel takes the qkv projection's rows as they come out
of the linear and does all of it: rotary embedding of q and k (Hugging Face's half-split layout,
the first rotary_dim dims of each head), k and v written into the sequence's cache at their
positions, and each query head's causal (optionally sliding-window) softmax over its group's
cached keys, weighted sum of values, in float32. It is the reference's arithmetic
(models/rope.py apply_rope, models/attention.py attend) in another summation order, so float32
outputs agree with it to ~1e-6 relative; no attention sinks, qk norms or interleaved rope (those
families take the torch path).

bfloat16 tensors are read as their bits (kernels/bf16_bits.py) and rounded where torch's are: each
rope product and sum (bfloat16 tensor ops), and inside the softmax as torch's CPU flash attention
does it (float32 scores, maximum and sum; each probability rounded to bfloat16 before it weighs the
values; the float32 weighted sum divided by the sum, rounded once). The rotated keys written into
the cache equal torch's bit for bit. The outputs do up to 15 visible keys; past that torch's
vectorised exp (an approximation) and its summation order move a float32 probability by an ulp
now and then, and where that lands next to a bfloat16 rounding boundary the output moves by one
bfloat16 ulp: a few percent of the elements at 16-500 keys (1e-4 to 1e-3 relative), more past 512,
where torch splits the keys into blocks. So bfloat16 takes this kernel only for decode proper, one
new token per sequence; a bfloat16 step with several new tokens (a short prompt's prefill) keeps
SDPA, whose logits match transformers' bit for bit.

Shapes: T new tokens at positions start .. start + T - 1; H query heads, Hkv key/value heads
(H a multiple of Hkv), Dh head dim; C cache capacity.
  qkv [T, H*Dh + 2*Hkv*Dh]: q heads, then k heads, then v heads, as the fused projection lays them
  cos, sin [T, rotary_dim]; k_cache, v_cache [Hkv, C, Dh] (one layer's); out [T, H*Dh]
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from moeinf.kernels.bf16_bits import as_numpy, as_tensor, narrow, rounded, widen
from moeinf.kernels.numba_cache import CALLS_PARALLEL

DTYPES = (torch.float32, torch.bfloat16)
MAX_TOKENS = 32  # new tokens a call is meant for (decode); larger steps run SDPA
FAST = {"reassoc", "contract"}  # vectorised sums and fused multiply-adds; NaN and infinity kept
NO_WINDOW = 0  # the window argument when every earlier position is visible


@njit(fastmath=FAST, cache=True)
def _rotate_head(qkv, t, base, cos, sin, half, rotary_dim, bf16, out):
    """out [Dh] float32 = token t's head starting at qkv[t, base], after the rotary embedding (a
    bfloat16 value where bf16: x * cos and rotate_half(x) * sin each rounded, then their sum). A
    head at a time: an inlined helper taking the arrays per element cost ~50 ns an element in
    reference counting, 5x the arithmetic."""
    for i in range(out.shape[0]):
        x = widen(qkv[t, base + i])
        if i < half:
            out[i] = rounded(
                rounded(x * cos[t, i], bf16) - rounded(widen(qkv[t, base + i + half]) * sin[t, i], bf16), bf16
            )
        elif i < rotary_dim:
            out[i] = rounded(
                rounded(x * cos[t, i], bf16) + rounded(widen(qkv[t, base + i - half]) * sin[t, i], bf16), bf16
            )
        else:
            out[i] = x


@njit(fastmath=FAST, cache=True, parallel=CALLS_PARALLEL)
def attend_rows(qkv, cos, sin, k_cache, v_cache, start, window, scale, heads, kv_heads, head_dim, bf16, out):
    """Rope and the cache writes serially (a few hundred elements), then the softmax rows in their
    own parallel function: with the writes in the same parallel function its dot products did not
    vectorise (3x slower at 160 cached positions). qkv, the caches and out: float32, or bfloat16
    bits (uint16) with bf16 set; cos, sin: float32."""
    T = qkv.shape[0]
    rotary_dim = cos.shape[1]
    half = rotary_dim // 2
    group = heads // kv_heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    key = np.empty(head_dim, np.float32)  # [Dh] one rotated key
    for t in range(T):  # the new keys and values into the cache
        for g in range(kv_heads):
            _rotate_head(qkv, t, q_dim + g * head_dim, cos, sin, half, rotary_dim, bf16, key)
            for i in range(head_dim):
                k_cache[g, start + t, i] = narrow(key[i], k_cache[g, start + t, i])
                v_cache[g, start + t, i] = qkv[t, q_dim + kv_dim + g * head_dim + i]
    q = np.empty((heads * T, head_dim), np.float32)  # [H*T, Dh] rotated queries, row h * T + t
    for item in range(heads * T):
        _rotate_head(qkv, item % T, (item // T) * head_dim, cos, sin, half, rotary_dim, bf16, q[item])
    attended = np.empty((heads * T, head_dim), np.float32)  # [H*T, Dh]
    _softmax_rows(q, k_cache, v_cache, start, T, window, scale, group, bf16, attended)
    for item in range(heads * T):
        h, t = item // T, item % T
        for i in range(head_dim):
            out[t, h * head_dim + i] = narrow(attended[item, i], out[t, h * head_dim + i])


@njit(parallel=True, fastmath=FAST, cache=True)
def _softmax_rows(q, k_cache, v_cache, start, T, window, scale, group, bf16, out):
    """out[h * T + t] = softmax over the keys query t of head h sees, of q.k * scale, times v.
    q, out: [H*T, Dh] float32; k_cache, v_cache: [Hkv, C, Dh]. In parallel over (head, token).
    Where bf16, each probability is rounded to bfloat16 before it weighs the values (torch's flash
    attention on the CPU does so); the sum they are divided by is of the float32 ones."""
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
                s += q[item, i] * widen(k_cache[g, j, i])
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
            p = rounded(scores[item, j], bf16)
            for i in range(head_dim):
                out[item, i] += p * widen(v_cache[g, j, i])
        for i in range(head_dim):
            out[item, i] /= total


def applies(qkv: torch.Tensor, k_cache: torch.Tensor, most_new_tokens: int) -> bool:
    """CPU float32 rows of a decode-sized step, or bfloat16 ones of a decode step proper (at most one
    new token per sequence: most_new_tokens, the most any sequence of the step brings), over a cache of
    their dtype."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype in DTYPES
        and qkv.dtype == k_cache.dtype
        and qkv.shape[0] <= MAX_TOKENS
        and (qkv.dtype == torch.float32 or most_new_tokens == 1)
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
    positions start .. start + T - 1; returns the attention output [T, H*Dh] in qkv's dtype.
    window: a query sees only the last `window` positions (its own included), None: all;
    scale: of q.k, None for Dh ** -0.5."""
    T = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    expected = (heads + 2 * kv_heads) * head_dim
    if not applies(qkv, k_cache, 1) or qkv.shape[1] != expected or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"host attention: expected CPU float32 or bfloat16 qkv [<= {MAX_TOKENS}, {expected}] and caches of its "
            f"dtype [{kv_heads}, C, {head_dim}], found qkv {qkv.dtype} {list(qkv.shape)}, k_cache "
            f"{k_cache.dtype} {list(k_cache.shape)}, v_cache {list(v_cache.shape)}"
        )
    if heads % kv_heads or start + T > k_cache.shape[1]:
        raise ValueError(
            f"host attention: expected heads a multiple of kv_heads and positions within the cache's "
            f"{k_cache.shape[1]}, found {heads} heads, {kv_heads} kv heads, positions {start} .. {start + T - 1}"
        )
    trig = (cos.float().contiguous().numpy(), sin.float().contiguous().numpy())
    caches = (as_numpy(k_cache), as_numpy(v_cache))
    return as_tensor(attend_decode_elements(as_numpy(qkv), *trig, *caches, start, window, scale, heads, kv_heads))


def attend_decode_elements(
    qkv: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    window: int | None,
    scale: float | None,
    heads: int,
    kv_heads: int,
) -> np.ndarray:
    """attend_decode on arrays already checked and converted (a decode step converts the rotary
    table once for all its layers, and its caches keep their arrays): qkv and the caches float32
    or bfloat16 bits alike, cos and sin float32. Returns the output's elements [T, H*Dh]."""
    head_dim = k_cache.shape[-1]
    out = np.empty((qkv.shape[0], heads * head_dim), qkv.dtype)
    attend_rows(
        qkv, cos, sin, k_cache, v_cache, start, NO_WINDOW if window is None else window,
        np.float32(head_dim**-0.5 if scale is None else scale), heads, kv_heads, head_dim, qkv.dtype == np.uint16, out,
    )  # fmt: skip
    return out
