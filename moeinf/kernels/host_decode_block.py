"""A decode step's layer around attention in host (CPU) calls: its dense side, and with resident
experts the routed experts too.

Between one layer's attention and the next, a decode token of the default model went through ~40
torch ops and Python calls (the residual add and its RMSNorm, the qkv projection, the output
projection, another add and norm, the router's projection, softmax, top k, renormalisation, dtype
casts), each ~3-20 us of dispatch around a few microseconds of arithmetic: ~0.6 ms a layer, a
third of the token. Here they are compiled calls, with the attention kernel (host_attention.py)
between them, per sequence:

  norm_and_project:       h += y; x = rms_norm(h); qkv = x @ Wqkv^T
  project_norm_route:     h += attn @ Wo^T; x = rms_norm(h); the router's softmax top k of x @ Wr^T
  route_experts_project:  with every expert resident (nothing to load, so nothing to ask the
                          expert source between routing and computing): project_norm_route, the
                          routed experts (host_experts.moe_layer_rows, from the slot buffers), and
                          the next layer's norm_and_project (the last layer: the final norm),
                          in one call: a layer is two calls
  decode_layers:          a lone sequence's whole step, every layer's attention
                          (host_attention.attend_rows) and route_experts_project, in one call

The projections run host_experts.project_dense (the expert kernels' tiles: weights read once for
all tokens, float32 accumulation), the norms host_norm's. The arithmetic is the torch path's with
its roundings: each projection's output rounded once to the model dtype (torch's bfloat16 linear
is the rounded float32 product), the router's logits in the router's dtype, the softmax in float32
over all experts (exp of the logit less the row's maximum, divided by their sum), the k largest in
descending order, renormalised to sum to one where the family does, times the family's scaling,
rounded to the dtype the family weighs expert outputs in. Only summation orders differ: float32
outputs agree with torch to ~1e-6 relative; bfloat16 ones to the bit but where a float32 sum lands
within an ulp of a rounding boundary (then by one bfloat16 ulp), and the softmax's exp is not
torch's vectorised one (a float32 ulp apart now and then, which a top-k choice sees only at a tie).

Shapes: T tokens; D hidden; N = q_dim + 2 kv_dim (the fused qkv projection's rows); A the
attention output's width; E experts, K of them per token. Arrays are float32, or bfloat16 bits
(uint16) where the model is bfloat16 (kernels/bf16_bits.py).
  h [T, D] the residual stream (added to in place); y [T, D] the last block's output
  norm weights [D]; w_qkv [N, D]; w_o [D, A]; w_router [E, D] (float32 or the model dtype)
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from moeinf.kernels.bf16_bits import narrow, widen
from moeinf.kernels.host_attention import attend_rows
from moeinf.kernels.host_experts import moe_layer_rows, project_dense
from moeinf.kernels.host_norm import add_rms_norm_rows, rms_norm_rows
from moeinf.kernels.numba_cache import CALLS_PARALLEL

DTYPES = (torch.float32, torch.bfloat16)
MAX_TOKENS = 32  # tokens a call is meant for (decode)
FAST = {"reassoc", "contract"}  # vectorised sums and fused multiply-adds; NaN and infinity kept


@njit(fastmath=FAST, cache=True)
def _widened(x):
    """x [T, K] elements -> a float32 copy [T, K]."""
    T, K = x.shape
    out = np.empty((T, K), np.float32)
    for t in range(T):
        for k in range(K):
            out[t, k] = widen(x[t, k])
    return out


@njit(fastmath=FAST, cache=True, parallel=CALLS_PARALLEL)
def project_rounded(x, w, out):
    """out [T, N] = x [T, K] @ w [N, K]^T, each output rounded once to out's elements."""
    T, N = out.shape
    product = np.empty((T, N), np.float32)  # [T, N]
    project_dense(w, _widened(x), product)
    for t in range(T):
        for n in range(N):
            out[t, n] = narrow(product[t, n], out[t, n])


@njit(fastmath=FAST, cache=True, parallel=CALLS_PARALLEL)
def norm_and_project(h, y, norm_weight, eps, bf16, scale_in_fp32, w_qkv, x_out, qkv_out):
    """h += y in place; x_out [T, D] = rms_norm(h) with norm_weight; qkv_out [T, N] = x_out @ w_qkv^T,
    rounded. bf16: the arrays are bfloat16 bits; scale_in_fp32: the norm's weight scales the float32
    row (GPT-OSS)."""
    add_rms_norm_rows(h, y, norm_weight, eps, bf16, scale_in_fp32, x_out)
    project_rounded(x_out, w_qkv, qkv_out)


@njit(fastmath=FAST, cache=True)
def _softmax_topk(logits, renormalize, scaling, ids_out, weights_out):
    """logits [T, E] float32 -> ids_out [T, K] int64, the K most probable experts (descending; the
    lower id first at a tie) and weights_out [T, K] their probabilities, renormalised where
    `renormalize`, times `scaling`, as weights_out's elements (float32, or bfloat16 bits)."""
    T, E = logits.shape
    K = ids_out.shape[1]
    probs = np.empty(E, np.float32)  # [E]
    taken = np.empty(E, np.bool_)  # [E]
    chosen = np.empty(K, np.float32)  # [K]
    for t in range(T):
        peak = logits[t, 0]
        for e in range(1, E):
            peak = max(peak, logits[t, e])
        total = np.float32(0.0)
        for e in range(E):
            probs[e] = np.exp(logits[t, e] - peak)
            total += probs[e]
        for e in range(E):
            probs[e] /= total
            taken[e] = False
        for k in range(K):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or probs[e] > probs[best]):
                    best = e
            taken[best] = True
            ids_out[t, k] = best
            chosen[k] = probs[best]
        norm = np.float32(0.0)
        for k in range(K):
            norm += chosen[k]
        for k in range(K):
            weight = chosen[k] / norm if renormalize else chosen[k]
            if scaling != 1.0:
                weight *= scaling
            weights_out[t, k] = narrow(weight, weights_out[t, k])


@njit(fastmath=FAST, cache=True, parallel=CALLS_PARALLEL)
def project_norm_route(
    attn, w_o, h, norm_weight, eps, bf16, scale_in_fp32, w_router, renormalize, scaling, o_out, x_out, ids_out,
    weights_out,
):  # fmt: skip
    """o_out [T, D] = attn [T, A] @ w_o^T, rounded; h += o_out in place; x_out [T, D] = rms_norm(h);
    ids_out, weights_out [T, K]: the router's choice for x_out (_softmax_topk over the logits
    x_out @ w_router^T, rounded to w_router's elements)."""
    project_rounded(attn, w_o, o_out)
    add_rms_norm_rows(h, o_out, norm_weight, eps, bf16, scale_in_fp32, x_out)
    T, E = x_out.shape[0], w_router.shape[0]
    logits = np.empty((T, E), np.float32)  # [T, E]
    project_dense(w_router, _widened(x_out), logits)
    for t in range(T):
        for e in range(E):
            logits[t, e] = widen(narrow(logits[t, e], w_router[0, 0]))  # in the router's dtype
    _softmax_topk(logits, renormalize, np.float32(scaling), ids_out, weights_out)


@njit(cache=True, parallel=CALLS_PARALLEL)
def route_experts_project(
    attn, w_o, h, ffn_norm, eps, bf16, scale_in_fp32, w_router, renormalize, scaling, weights_out, weigh_bf16, slots,
    w13, w2, no_bias, F, activation, alpha, limit, has_next, next_norm, w_qkv, qkv_out,
):  # fmt: skip
    """A MoE layer of resident experts from its attention output to the next layer's qkv: project_norm_route;
    the routed experts of its choice, read from the slot buffers (host_experts.moe_layer_rows: w13,
    w2, no_bias as host_experts.slot_buffers gives them; slots [E] the layer's slot of each
    expert); h += their output; where has_next, norm_and_project of the new h with the next layer's
    next_norm and w_qkv into qkv_out [T, N], else (the last layer) h normed with next_norm, the
    model's final norm, into qkv_out [T, D] (w_qkv unused). weights_out [T, K]: the routing weights' elements, in
    the dtype expert outputs are weighed in (bfloat16 bits where weigh_bf16). Returns the number of distinct experts the layer used."""
    T, D = h.shape
    K = weights_out.shape[1]
    o, x, y = np.empty_like(h), np.empty_like(h), np.empty_like(h)  # [T, D] each
    ids = np.empty((T, K), np.int64)  # [T, K]
    project_norm_route(
        attn, w_o, h, ffn_norm, eps, bf16, scale_in_fp32, w_router, renormalize, scaling, o, x, ids, weights_out
    )
    E = slots.shape[0]
    moe_layer_rows(
        x, ids, weights_out, slots, np.full(E, -1, np.int64), w13, w13, w2, w2, no_bias, no_bias, no_bias, no_bias,
        False, bf16, weigh_bf16, activation, alpha, limit, F, y,
    )  # fmt: skip
    if has_next:
        norm_and_project(h, y, next_norm, eps, bf16, scale_in_fp32, w_qkv, x, qkv_out)
    else:  # the last layer: the model's final norm
        add_rms_norm_rows(h, y, next_norm, eps, bf16, scale_in_fp32, qkv_out)
    used = np.zeros(E, np.bool_)  # [E]
    for t in range(T):
        for k in range(K):
            used[ids[t, k]] = True
    return used.sum()


@njit(cache=True, parallel=CALLS_PARALLEL)
def decode_layers(
    h, cos, sin, k_all, v_all, start, windows, scale, heads, kv_heads, head_dim, attn_norms, w_qkvs, w_os, ffn_norms,
    w_routers, final_norm, eps, bf16, scale_in_fp32, renormalize, scaling, weights_out, weigh_bf16, slots, w13, w2,
    no_bias, F, activation, alpha, limit, out,
):  # fmt: skip
    """A lone sequence's whole decode step with resident experts, every layer in one call: the
    first norm and qkv projection, then per layer host_attention.attend_rows and route_experts_project, the last ending
    in the final norm, into out [T, D]. Per layer: k_all, v_all [L, Hkv, C, Dh] the caches;
    windows [L] int64; attn_norms, w_qkvs, w_os, ffn_norms, w_routers: tuples of the layers' arrays;
    weights_out [L, T, K] the routing weights' elements; slots [L, E] each expert's slot. Returns the
    distinct experts the layers used, summed."""
    T, L = h.shape[0], len(w_qkvs)
    normed = np.empty_like(h)  # [T, D] the first layer's input
    rms_norm_rows(h, attn_norms[0], eps, bf16, scale_in_fp32, normed)
    qkv = np.empty((T, w_qkvs[0].shape[0]), h.dtype)  # [T, q_dim + 2 kv_dim]
    project_rounded(normed, w_qkvs[0], qkv)
    attn = np.empty((T, heads * head_dim), h.dtype)  # [T, q_dim] each layer's attention output
    hits = 0
    for layer in range(L):
        has_next = layer + 1 < L
        if has_next:
            next_norm, w_qkv = attn_norms[layer + 1], w_qkvs[layer + 1]
            next_qkv = np.empty((T, w_qkv.shape[0]), h.dtype)
        else:
            next_norm, w_qkv, next_qkv = final_norm, w_qkvs[0], out
        attend_rows(
            qkv,
            cos,
            sin,
            k_all[layer],
            v_all[layer],
            start,
            windows[layer],
            scale,
            heads,
            kv_heads,
            head_dim,
            bf16,
            attn,
        )
        hits += route_experts_project(
            attn, w_os[layer], h, ffn_norms[layer], eps, bf16, scale_in_fp32, w_routers[layer], renormalize, scaling,
            weights_out[layer], weigh_bf16, slots[layer], w13, w2, no_bias, F, activation, alpha, limit, has_next,
            next_norm, w_qkv, next_qkv,
        )  # fmt: skip
        qkv = next_qkv
    return hits
