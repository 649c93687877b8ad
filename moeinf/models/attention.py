"""Grouped-query attention of one sequence's new tokens over its KV cache, through torch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(start: int, new: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [new, start + new] mask (True = may attend), or None when plain SDPA causality fits.

    Query i sits at absolute position start + i; it sees keys at positions <= its own and, with a
    sliding window, only the last `sliding_window` of them.
    """
    total = start + new
    window_binds = sliding_window is not None and total > sliding_window
    if not window_binds and (new == 1 or start == 0):
        return None
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
) -> torch.Tensor:
    """q: [new, H, Dh]; k_cache, v_cache: [Hkv, start + new, Dh] (the new keys already written).

    Returns [new, H * Dh].
    """
    new, heads, head_dim = q.shape
    mask = causal_mask(start, new, sliding_window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k_cache[None],
        v_cache[None],
        attn_mask=mask,
        is_causal=mask is None and new > 1,
        enable_gqa=k_cache.shape[0] != heads,
    )  # [1, H, new, Dh]
    return out[0].transpose(0, 1).reshape(new, heads * head_dim)
