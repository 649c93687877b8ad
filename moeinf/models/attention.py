"""Grouped-query attention of one sequence's new tokens over its KV cache, through torch SDPA, or
explicitly where attention sinks join the softmax (GPT-OSS), which SDPA cannot express."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(start: int, new: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [new, start + new] mask (True = may attend), or None when plain SDPA causality fits."""
    total = start + new
    window_binds = sliding_window is not None and total > sliding_window
    if not window_binds and (new == 1 or start == 0):
        return None
    return visible_keys(start, new, sliding_window, device)


def visible_keys(start: int, new: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [new, start + new]: query i sits at absolute position start + i; it sees keys at
    positions <= its own and, with a sliding window, only the last `sliding_window` of them."""
    total = start + new
    q_pos = torch.arange(start, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    return mask


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    sliding_window: int | None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [new, H, Dk]; k_cache: [Hkv, start + new, Dk], v_cache: [Hkv, start + new, Dv] (the new
    keys already written); scale: of q.k, None for Dk ** -0.5; sinks: [H] per-head sink logits.

    Returns [new, H * Dv].
    """
    new, heads, _ = q.shape
    if sinks is not None:
        out = _attend_with_sinks(q.transpose(0, 1), k_cache, v_cache, start, sliding_window, scale, sinks)
        return out.transpose(0, 1).reshape(new, heads * v_cache.shape[-1])
    mask = causal_mask(start, new, sliding_window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k_cache[None],
        v_cache[None],
        attn_mask=mask,
        is_causal=mask is None and new > 1,
        scale=scale,
        enable_gqa=k_cache.shape[0] != heads,
    )  # [1, H, new, Dv]
    return out[0].transpose(0, 1).reshape(new, heads * v_cache.shape[-1])


def _attend_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    sliding_window: int | None,
    scale: float | None,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """q: [H, new, Dk]; k: [Hkv, S, Dk]; v: [Hkv, S, Dv]; sinks: [H]. Returns [H, new, Dv].

    Each head's softmax runs over its keys and one extra logit, the sink, whose probability is then
    dropped: a head can put weight on "nothing" rather than on its keys."""
    heads, new, head_dim = q.shape
    group = heads // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # [H, S, D]
    scores = torch.matmul(q, k.transpose(1, 2)) * (head_dim**-0.5 if scale is None else scale)  # [H, new, S]
    visible = visible_keys(start, new, sliding_window, q.device)  # [new, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.to(scores.dtype).view(heads, 1, 1).expand(heads, new, 1)
    logits = torch.cat([scores, sink], dim=-1)  # [H, new, S + 1]
    # shifted by the row maximum and normalised in the model dtype (softmax accumulates in float32
    # inside), transformers' order, so bfloat16 runs round as it does
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
