"""Routing rules: router logits -> the experts each token uses and their weights."""

from __future__ import annotations

import torch

from moeinf.kernels import ops


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> (ids [T, K] int64, weights [T, K] float32).

    Softmax over all experts in float32, then the top k; Mixtral renormalises them to sum to one,
    Qwen and OLMoE where norm_topk_prob says so.
    """
    return ops.softmax_topk(logits, top_k, renormalize)
