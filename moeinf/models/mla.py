"""Multi-head latent attention (DeepSeek-V2/V3).

Each token's keys and values come from one low-rank latent c = RMSNorm(x @ W_kv_a) (kv_lora_rank
wide) and a single rotary key k_rot shared by all heads; only [c, k_rot] is cached per token.
Each step expands the cached latents through kv_b_proj into per-head keys (no positions) and values:

    q       = x @ W_q  (or RMSNorm(x @ W_q_a) @ W_q_b)         [T, H, nope + rope]
    [c, kr] = x @ W_kv_a;  c = RMSNorm(c);  kr = rope(kr)      [T, kv_lora], [T, rope]
    [kn, v] = c @ W_kv_b                                       [S, H, nope], [S, H, v_head]
    k       = [kn, kr broadcast over heads]                    [S, H, nope + rope]

and queries rotate only their last qk_rope_head_dim dims, as the keys do.

Expanding costs S * kv_lora * H * (nope + v) per step, whatever the number of new tokens, which
dominates decoding. For a few new tokens the attention runs in latent space instead ("weight
absorption"): W_kv_b splits per head into W_uk [nope, kv_lora] and W_uv [v_head, kv_lora], and

    q_nope . k_nope = (q_nope @ W_uk) . c        softmax(...) @ v = (softmax(...) @ c) @ W_uv^T

so every head attends over the cached [c, kr] themselves (one shared key/value head, as MQA) with
queries [q_nope @ W_uk, q_rot], all heads folded into one attention over the cache; the same
arithmetic in another order, equal up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeinf.kernels.ops import Kernels
from moeinf.models.attention import attend, causal_mask, visible_keys
from moeinf.models.rope import apply_rope, apply_rope_interleaved
from moeinf.models.spec import ModelSpec

# DeepSeek builds its q_a and kv_a norms with RMSNorm's default eps, not the config's rms_norm_eps
LATENT_NORM_EPS = 1e-6


@dataclass
class MLAWeights:
    kv_a: torch.Tensor  # [kv_lora + rope, D]
    kv_a_norm: torch.Tensor  # [kv_lora]
    kv_b: torch.Tensor  # [H * (nope + v_head), kv_lora]
    q: torch.Tensor | None = None  # [H * (nope + rope), D] when q_lora_rank is None
    q_a: torch.Tensor | None = None  # [q_lora, D]
    q_a_norm: torch.Tensor | None = None  # [q_lora]
    q_b: torch.Tensor | None = None  # [H * (nope + rope), q_lora]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if spec.rope_fp32:  # cos, sin are float32 then (see Executor.forward): one rounding at the end
        return apply_rope_interleaved(x.float(), cos, sin).to(x.dtype)
    return apply_rope_interleaved(x, cos, sin) if spec.rope_interleaved else apply_rope(x, cos, sin)


def queries(
    x: torch.Tensor, w: MLAWeights, spec: ModelSpec, cos: torch.Tensor, sin: torch.Tensor, kernels: Kernels
) -> torch.Tensor:
    """x: [T, D] normed hidden states; cos, sin: [T, rope]. Returns q [T, H, nope + rope], rotated."""
    T, mla = x.shape[0], spec.mla
    if w.q is not None:
        q = F.linear(x, w.q)
    else:
        q = F.linear(kernels.rms_norm(F.linear(x, w.q_a), w.q_a_norm, LATENT_NORM_EPS), w.q_b)
    q = q.view(T, spec.num_heads, mla.qk_head_dim)
    q_nope, q_rot = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
    return torch.cat([q_nope, _rotate(q_rot, cos, sin, spec)], dim=-1)


def latents(
    x: torch.Tensor, w: MLAWeights, spec: ModelSpec, cos: torch.Tensor, sin: torch.Tensor, kernels: Kernels
) -> torch.Tensor:
    """x: [T, D] -> what the cache keeps per token: [T, 1, kv_lora + rope], the normed latent then
    the rotated shared key."""
    mla = spec.mla
    c, k_rot = F.linear(x, w.kv_a).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    c = kernels.rms_norm(c, w.kv_a_norm, LATENT_NORM_EPS)  # [T, kv_lora]
    k_rot = _rotate(k_rot[:, None, :], cos, sin, spec)  # [T, 1, rope]
    return torch.cat([c[:, None, :], k_rot], dim=-1)


def expand(cached: torch.Tensor, w: MLAWeights, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cached: [1, S, kv_lora + rope] -> keys [H, S, nope + rope], values [H, S, v_head]."""
    mla, S = spec.mla, cached.shape[1]
    c, k_rot = cached[0].split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)  # [S, kv_lora], [S, rope]
    kv = F.linear(c, w.kv_b).view(S, spec.num_heads, mla.qk_nope_head_dim + mla.v_head_dim)
    k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)  # [S, H, nope], [S, H, v_head]
    k = torch.cat([k_nope, k_rot[:, None, :].expand(S, spec.num_heads, mla.qk_rope_head_dim)], dim=-1)
    return k.transpose(0, 1), v.transpose(0, 1)


def absorbed_is_cheaper(new: int, spec: ModelSpec) -> bool:
    """Whether attending `new` queries in latent space costs fewer multiply-adds than expanding the
    cache: new * (2 kv_lora + rope) per cached token and head, against kv_lora * (nope + v)."""
    mla = spec.mla
    latent = new * (2 * mla.kv_lora_rank + mla.qk_rope_head_dim)
    return latent < mla.kv_lora_rank * (mla.qk_nope_head_dim + mla.v_head_dim)


def attend_cached(
    q: torch.Tensor,
    cached: torch.Tensor,
    w: MLAWeights,
    spec: ModelSpec,
    start: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """q: [new, H, nope + rope] rotated queries of one sequence; cached: [1, S, kv_lora + rope] its
    whole latent cache (the new tokens written). Returns the attention output [new, H * v_head],
    by the cheaper of expanding the cache and attending in latent space."""
    if absorbed_is_cheaper(q.shape[0], spec):
        return attend_latent(q, cached, w, spec, start, sliding_window)
    k, v = expand(cached, w, spec)  # [H, S, nope + rope], [H, S, v_head]
    return attend(q, k, v, start, sliding_window, spec.attention_scale)


def attend_latent(
    q: torch.Tensor,
    cached: torch.Tensor,
    w: MLAWeights,
    spec: ModelSpec,
    start: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """attend_cached's contract, computed in latent space (weight absorption) without expanding."""
    mla, heads = spec.mla, spec.num_heads
    kv_b = w.kv_b.view(heads, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
    w_uk, w_uv = kv_b.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=1)  # [H, nope, C], [H, v_head, C]
    q_nope, q_rot = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
    q_latent = torch.cat([torch.einsum("nhd,hdc->nhc", q_nope, w_uk), q_rot], dim=-1)  # [new, H, C + rope]
    # the scale of the real q.k (nope + rope dims), not of the latent-space product's width
    scale = spec.attention_scale if spec.attention_scale is not None else mla.qk_head_dim**-0.5
    out = _attend_one_head(q_latent, cached[0], mla.kv_lora_rank, start, sliding_window, scale)
    out = torch.einsum("nhc,hvc->nhv", out, w_uv)  # [new, H, v_head]
    return out.reshape(q.shape[0], heads * mla.v_head_dim)


def _attend_one_head(
    q: torch.Tensor, cached: torch.Tensor, value_dim: int, start: int, sliding_window: int | None, scale: float
) -> torch.Tensor:
    """Every query head against the one latent key/value head: q [new, H, C + rope], cached
    [S, C + rope] (values: its first value_dim dims) -> [new, H, value_dim]. The heads fold into the
    query rows (row n * H + h), so it is one plain attention, not H copies of the cache."""
    new, heads, width = q.shape
    mask = causal_mask(start, new, sliding_window, q.device)
    if mask is None and new > 1:
        mask = visible_keys(start, new, sliding_window, q.device)  # [new, S]; causality by token, not row
    if mask is not None:
        mask = mask.repeat_interleave(heads, dim=0)  # [new * H, S]
    out = F.scaled_dot_product_attention(
        q.reshape(1, 1, new * heads, width), cached[None, None], cached[None, None, :, :value_dim],
        attn_mask=mask, scale=scale,
    )  # fmt: skip
    return out.view(new, heads, value_dim)
