"""The ops the runtime calls. Each picks its implementation by device; today every device runs
the torch reference, and the Triton kernels plug in here for CUDA."""

from __future__ import annotations

import torch

from moeinf.kernels.reference import moe_experts_reference, rms_norm_reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_slots: torch.Tensor,
) -> torch.Tensor:
    return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, expert_slots)
