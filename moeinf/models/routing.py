"""Routing rules: router logits -> the experts each token uses and their weights.

A family names its rule in ModelSpec.routing; the executor calls `route`, which dispatches on it.
"""

from __future__ import annotations

import torch

from moeinf.kernels import ops
from moeinf.models.spec import ModelSpec


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> (ids [T, K] int64, weights [T, K] float32).

    Softmax over all experts in float32, then the top k; Mixtral renormalises them to sum to one,
    Qwen and OLMoE where norm_topk_prob says so.
    """
    return ops.softmax_topk(logits, top_k, renormalize)


def _sparse_softmax_pick(
    scores: torch.Tensor, candidates: torch.Tensor, jitter_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparsemixer pick. scores: [T, E] the router logits; candidates: [T, E] the logits with
    already picked experts at -inf. Returns (id [T, 1], weight [T, 1] in the logits' dtype).

    The pick is the best candidate; its weight is a softmax over the candidates within a relative
    distance 2 * jitter_eps of it. The distance divides by |score| clamped at the pick's logit, of
    the ORIGINAL scores (transformers does so for the second pick as well).
    """
    best, pick = candidates.max(dim=-1, keepdim=True)  # [T, 1]
    factor = scores.abs().clamp(min=best)  # [T, E]
    far = (best - scores) / factor > 2 * jitter_eps  # [T, E]
    gates = torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1)  # [T, E]
    return pick, gates.gather(dim=-1, index=pick)


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's routing in eval mode. logits: [T, E] -> (ids [T, 2] int64, weights [T, 2] float32).

    Always two experts: the argmax, then the argmax of the rest, each weighted by its own masked
    softmax (see _sparse_softmax_pick); the two weights are not renormalised. The arithmetic runs in
    the logits' dtype as transformers' does, so bfloat16 weights match it bit for bit.
    """
    first, first_weight = _sparse_softmax_pick(logits, logits, jitter_eps)
    rest = torch.scatter(logits, -1, first, float("-inf"))  # [T, E]
    second, second_weight = _sparse_softmax_pick(logits, rest, jitter_eps)
    ids = torch.cat((first, second), dim=-1)  # [T, 2]
    weights = torch.cat((first_weight, second_weight), dim=-1).to(torch.float32)  # [T, 2]
    return ids, weights


def route(logits: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> (ids [T, K] int64, weights [T, K] float32) by the family's rule."""
    if spec.routing == "sparsemixer":
        return sparsemixer(logits, spec.router_jitter_eps)
    if spec.routing == "softmax_topk":
        return softmax_topk(logits, spec.top_k, spec.renormalize_topk)
    raise AssertionError(f"routing rule {spec.routing!r} is set by a family but has no function here")
