"""Plain torch references for every kernel; the CPU path runs these, tests and benchmarks compare
against them. Shapes: T tokens, D hidden, F expert ffn, E experts, K experts per token, S slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeinf.kernels.expert_activation import SILU, ExpertActivation


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, scale_in_fp32: bool = False) -> torch.Tensor:
    # x: [T, D], weight: [D]; statistics in float32 whatever the input dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_fp32:  # GPT-OSS: the weight scales the float32 rows, then one rounding
        return (weight.to(torch.float32) * xf).to(x.dtype)
    return weight * xf.to(x.dtype)  # Llama and most families: rows rounded first; dtype of weight * x


def expect_both_biases_or_neither(where: str, b13: torch.Tensor | None, b2: torch.Tensor | None) -> None:
    if (b13 is None) != (b2 is None):
        raise ValueError(
            f"{where} b13 and b2: expected both or neither, found "
            f"b13 {'None' if b13 is None else 'given'}, b2 {'None' if b2 is None else 'given'}"
        )


def moe_experts_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_slots: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ExpertActivation = SILU,
) -> torch.Tensor:
    """Routed gated-MLP experts read through a slot table, combined with the routing weights.

    x: [T, D]; topk_ids: [T, K] expert ids; topk_weights: [T, K] float32, or x's dtype where the
    family weighs expert outputs in the model dtype;
    w13: [S, 2F, D] gate rows then up rows; w2: [S, D, F]; expert_slots: [E] slot of each expert
    (only the routed ones need be valid). Returns [T, D] in x's dtype.
    b13: [S, 2F] gate biases then up biases, b2: [S, D] down biases, slot-indexed like the weights
    (GPT-OSS; both or neither); activation: of (gate, up), SwiGLU unless given.
    Per pair: y * weight with y = activation(gate, up) @ w2^T + b2, (gate, up) = x @ w13^T + b13,
    the product in torch's promoted dtype (float32 with float32 weights; rounded to x's dtype with
    weights in it); a token's K products summed by torch's sum over k (float32 accumulation) and
    rounded once to x's dtype: transformers' grouped_mm experts, bit for bit on the CPU.
    """
    expect_both_biases_or_neither("moe_experts_reference", b13, b2)
    T, K = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # [T*K] pair index, grouped by expert
    counts = torch.bincount(flat_ids, minlength=expert_slots.shape[0]).tolist()
    slots = expert_slots.tolist()
    flat_weights = topk_weights.reshape(-1)
    ffn = w2.shape[-1]
    products = torch.empty((T * K, x.shape[-1]), dtype=torch.promote_types(x.dtype, topk_weights.dtype))
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // K
        slot = slots[expert]
        gate_up = F.linear(x[tokens], w13[slot])  # [count, 2F]
        if b13 is not None:  # added to the rounded product, as transformers' GptOssExperts does
            gate_up = gate_up + b13[slot]
        gate, up = gate_up.split(ffn, dim=-1)
        y = F.linear(activation(gate, up), w2[slot])  # [count, D]
        if b2 is not None:
            y = y + b2[slot]
        products[pairs] = y * flat_weights[pairs, None]  # [count, D]
    return products.view(T, K, -1).sum(dim=1).to(x.dtype)


def rms_norm_residual_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, scale_in_fp32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm block's residual add, then RMSNorm: returns (normed, new residual).

    x, residual: [T, D]; the sum is rounded to x's dtype before its statistics are taken, as in
    the unfused `h = h + x; rms_norm(h)`."""
    h = x + residual
    return rms_norm_reference(h, weight, eps, scale_in_fp32), h


def softmax_topk_reference(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral, Qwen-MoE, OLMoE routing. logits: [T, E] -> (ids [T, K] int64, weights [T, K] float32),
    sorted by weight, descending. Softmax over all experts in float32, then the top k, renormalised
    to sum to one where the family does so (Mixtral; Qwen with norm_topk_prob)."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def grouped_sigmoid_topk_reference(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing, as transformers' DeepseekV3TopkRouter computes it.

    logits: [T, E]; bias: [E] e_score_correction_bias. Choice scores are sigmoid(logits) + bias;
    a group's score is the sum of its two best choice scores; the topk_group best groups are kept
    and the top k experts among them chosen. Their weights are the sigmoid scores without the bias,
    renormalised (norm_topk_prob) and times routed_scaling_factor. Returns (ids [T, K] int64,
    weights [T, K] float32) sorted by choice score, descending (transformers leaves them unsorted).
    """
    T, E = logits.shape
    scores = torch.sigmoid(logits.to(torch.float32))  # [T, E]
    choice = scores + bias.to(torch.float32)  # [T, E]
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, n_group]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, n_group]
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    ids = torch.topk(choice.masked_fill(expert_mask == 0, float("-inf")), k=top_k, dim=-1)[1]  # [T, K]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling
