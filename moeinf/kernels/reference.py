"""Plain torch references for every kernel; the CPU path runs these, tests and benchmarks compare
against them. Shapes: T tokens, D hidden, F expert ffn, E experts, K experts per token, S slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, D], weight: [D]; statistics in float32 whatever the input dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def moe_experts_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_slots: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts read through a slot table, combined with the routing weights.

    x: [T, D]; topk_ids: [T, K] expert ids; topk_weights: [T, K] (float32 from the router);
    w13: [S, 2F, D] gate rows then up rows; w2: [S, D, F]; expert_slots: [E] slot of each expert
    (only the routed ones need be valid). Returns [T, D] in x's dtype.
    Experts are visited in ascending id and summed with index_add_, the order transformers uses.
    """
    T, K = topk_ids.shape
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # [T*K] pair index, grouped by expert
    counts = torch.bincount(flat_ids, minlength=expert_slots.shape[0]).tolist()
    slots = expert_slots.tolist()
    flat_weights = topk_weights.reshape(-1)
    ffn = w2.shape[-1]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // K
        slot = slots[expert]
        gate, up = F.linear(x[tokens], w13[slot]).split(ffn, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[slot])
        y = y * flat_weights[pairs, None]
        out.index_add_(0, tokens, y.to(x.dtype))
    return out
