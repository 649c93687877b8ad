"""Routing rules: router logits -> the experts each token uses and their weights.

A family names its rule in ModelSpec.routing; the executor calls `route`, which dispatches on it.
"""

from __future__ import annotations

import torch

from moeinf.kernels.ops import Kernels
from moeinf.models.spec import ModelSpec


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


def group_limited_softmax_topk(
    logits: torch.Tensor, top_k: int, n_group: int, topk_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's group_limited_greedy. logits: [T, E] -> (ids [T, K], weights [T, K] float32).

    Softmax over all experts in float32; a group's score is its best expert's; only the topk_group
    best groups' experts may be picked (the others' scores are zeroed); the top k of the rest, not
    renormalised."""
    T, E = logits.shape
    scores = torch.softmax(logits.to(torch.float32), dim=-1)  # [T, E]
    group_scores = scores.view(T, n_group, E // n_group).amax(dim=-1)  # [T, n_group]
    groups = torch.topk(group_scores, k=topk_group, dim=-1)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, groups, 1.0)  # [T, n_group]
    expert_mask = group_mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    weights, ids = torch.topk(scores.masked_fill(expert_mask == 0, 0.0), k=top_k, dim=-1)
    return ids, weights


def topk_then_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: the top k logits, then a softmax over those k alone, in the logits' dtype as
    transformers computes it. logits: [T, E] -> (ids [T, K] int64, weights [T, K] float32)."""
    values, ids = torch.topk(logits, top_k, dim=-1)
    return ids, torch.softmax(values, dim=-1).to(torch.float32)


def route(
    logits: torch.Tensor, spec: ModelSpec, kernels: Kernels, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> (ids [T, K] int64, weights [T, K] float32) by the family's rule.
    correction_bias: [E] DeepSeek-V3's e_score_correction_bias (sigmoid_grouped only). The two
    rules with kernels (softmax_topk: softmax over all experts in float32, then the top k,
    renormalised where the family says so; sigmoid_grouped) run through `kernels`."""
    if spec.routing == "sparsemixer":
        return sparsemixer(logits, spec.router_jitter_eps)
    if spec.routing == "topk_softmax":
        return topk_then_softmax(logits, spec.top_k)
    if spec.routing == "sigmoid_grouped":
        return kernels.grouped_sigmoid_topk(
            logits, correction_bias, spec.top_k, spec.n_group, spec.topk_group, spec.renormalize_topk,
            spec.routed_scaling_factor,
        )  # fmt: skip
    if spec.routing == "softmax_grouped":
        ids, weights = group_limited_softmax_topk(logits, spec.top_k, spec.n_group, spec.topk_group)
    elif spec.routing == "softmax_topk":
        ids, weights = kernels.softmax_topk(logits, spec.top_k, spec.renormalize_topk)
    else:
        raise AssertionError(f"routing rule {spec.routing!r} is set by a family but has no function here")
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return ids, weights
