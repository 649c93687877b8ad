"""Router top-k: router logits -> the experts each token uses and their weights, one row block of
tokens per program, all experts of a row in registers.

    softmax_topk          softmax over experts, top k, optionally renormalised
                          (Mixtral; Qwen-MoE and OLMoE through norm_topk_prob)
    grouped_sigmoid_topk  DeepSeek-V3: sigmoid scores + correction bias, group-limited top k

Top k is K rounds of "take the row's maximum, then mask it out"; among equal scores the lowest
expert id wins (torch.topk leaves ties unspecified, so tests use tie-free inputs). Ids come out
sorted by score, descending, as torch.topk(sorted=True) gives them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _take_topk(
    choice, values, cols, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr
):
    # choice: [BLOCK_T, BLOCK_E], -inf where an expert may not be chosen; values: [BLOCK_T, BLOCK_E]
    # returns ids, the chosen values: [BLOCK_T, BLOCK_K] (columns >= TOP_K are 0)
    ks = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    picked = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)
        idx = tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest id on ties
        hit = cols[None, :] == idx[:, None]
        value = tl.sum(tl.where(hit, values, 0.0), axis=1)
        ids = tl.where(ks[None, :] == k, idx[:, None].to(tl.int64), ids)
        picked = tl.where(ks[None, :] == k, value[:, None], picked)
        choice = tl.where(hit, float("-inf"), choice)
    return ids, picked


@triton.jit
def _softmax_topk_kernel(
    logits_ptr,  # logits: [T, E]
    ids_ptr,  # ids: [T, K] int64
    weights_ptr,  # weights: [T, K] float32
    num_tokens,
    num_experts,
    stride_lt,
    stride_le,
    stride_it,
    stride_ik,
    stride_wt,
    stride_wk,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    logits = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    logits = tl.where(row_ok[:, None], logits, 0.0)  # rows past the end: finite, never stored
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    ids, weights = _take_topk(
        tl.where(col_ok[None, :], probs, float("-inf")), probs, cols, TOP_K, BLOCK_T, BLOCK_E, BLOCK_K
    )
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    ks = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (ks < TOP_K)[None, :]
    tl.store(ids_ptr + rows[:, None] * stride_it + ks[None, :] * stride_ik, ids, mask=mask)
    tl.store(weights_ptr + rows[:, None] * stride_wt + ks[None, :] * stride_wk, weights, mask=mask)


@triton.jit
def _grouped_sigmoid_topk_kernel(
    logits_ptr,  # logits: [T, E]
    bias_ptr,  # bias: [E] float32
    ids_ptr,  # ids: [T, K] int64
    weights_ptr,  # weights: [T, K] float32
    num_tokens,
    num_experts,
    group_size,
    scaling,
    stride_lt,
    stride_le,
    stride_it,
    stride_ik,
    stride_wt,
    stride_wk,
    TOP_K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    logits = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    scores = tl.sigmoid(logits)  # [BLOCK_T, BLOCK_E]
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    choice = tl.where(col_ok[None, :], scores + bias[None, :], float("-inf"))
    group_of = cols // group_size  # [BLOCK_E]; group sizes need not be powers of two
    gs = tl.arange(0, BLOCK_G)
    group_scores = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
    for g in tl.static_range(N_GROUP):
        in_group = tl.where((group_of == g)[None, :], choice, float("-inf"))
        top1 = tl.max(in_group, axis=1)
        idx1 = tl.min(tl.where(in_group == top1[:, None], cols[None, :], BLOCK_E), axis=1)
        top2 = tl.max(tl.where(cols[None, :] == idx1[:, None], float("-inf"), in_group), axis=1)
        group_scores = tl.where(gs[None, :] == g, (top1 + top2)[:, None], group_scores)
    keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(group_scores, axis=1)
        gi = tl.min(tl.where(group_scores == best[:, None], gs[None, :], BLOCK_G), axis=1)
        keep = keep | (group_of[None, :] == gi[:, None])
        group_scores = tl.where(gs[None, :] == gi[:, None], float("-inf"), group_scores)
    ids, weights = _take_topk(tl.where(keep, choice, float("-inf")), scores, cols, TOP_K, BLOCK_T, BLOCK_E, BLOCK_K)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    weights = weights * scaling
    ks = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (ks < TOP_K)[None, :]
    tl.store(ids_ptr + rows[:, None] * stride_it + ks[None, :] * stride_ik, ids, mask=mask)
    tl.store(weights_ptr + rows[:, None] * stride_wt + ks[None, :] * stride_wk, weights, mask=mask)


# ---------------------------------------------------------------------------------------- launchers


def _check(logits: torch.Tensor, top_k: int, ids: torch.Tensor, weights: torch.Tensor) -> tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a [T, E] tensor, found shape {list(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits dtype: expected float16, bfloat16 or float32, found {logits.dtype}")
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected 1 <= top_k <= E = {E}, found {top_k}")
    for name, out, dtype in (("ids", ids, torch.int64), ("weights", weights, torch.float32)):
        if tuple(out.shape) != (T, top_k) or out.dtype != dtype or out.device != logits.device:
            raise ValueError(
                f"{name}: expected [{T}, {top_k}] {dtype} on {logits.device}, "
                f"found {list(out.shape)} {out.dtype} on {out.device}"
            )
    return T, E


def _row_block(T: int, block_e: int) -> int:
    # several tokens per program where experts are few, so the tile keeps about 4096 elements
    return max(1, min(triton.next_power_of_2(T), 4096 // block_e))


def softmax_topk_into(
    logits: torch.Tensor, top_k: int, renormalize: bool, ids: torch.Tensor, weights: torch.Tensor
) -> None:
    """softmax_topk writing into ids [T, K] int64 and weights [T, K] float32."""
    T, E = _check(logits, top_k, ids, weights)
    if T == 0:
        return
    block_e = triton.next_power_of_2(E)
    block_t = _row_block(T, block_e)
    _softmax_topk_kernel[(triton.cdiv(T, block_t),)](
        logits, ids, weights, T, E,
        logits.stride(0), logits.stride(1), ids.stride(0), ids.stride(1), weights.stride(0), weights.stride(1),
        TOP_K=top_k, RENORMALIZE=bool(renormalize),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
    )  # fmt: skip


def grouped_sigmoid_topk_into(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """grouped_sigmoid_topk writing into ids [T, K] int64 and weights [T, K] float32."""
    T, E = _check(logits, top_k, ids, weights)
    if n_group < 1 or E % n_group or E // n_group < 2:
        raise ValueError(f"n_group: expected a divisor of E = {E} leaving >= 2 experts a group, found {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group: expected 1 <= topk_group <= n_group = {n_group}, found {topk_group}")
    if top_k > topk_group * (E // n_group):
        raise ValueError(
            f"top_k: expected at most topk_group * E / n_group = {topk_group * (E // n_group)} "
            f"(the experts of the kept groups), found {top_k}"
        )
    if tuple(bias.shape) != (E,) or bias.dtype != torch.float32 or bias.device != logits.device:
        raise ValueError(
            f"bias: expected [{E}] float32 on {logits.device}, found {list(bias.shape)} {bias.dtype} on {bias.device}"
        )
    if T == 0:
        return
    block_e = triton.next_power_of_2(E)
    block_t = _row_block(T, block_e)
    _grouped_sigmoid_topk_kernel[(triton.cdiv(T, block_t),)](
        logits, bias, ids, weights, T, E, E // n_group, float(scaling),
        logits.stride(0), logits.stride(1), ids.stride(0), ids.stride(1), weights.stride(0), weights.stride(1),
        TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, RENORMALIZE=bool(renormalize),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_K=triton.next_power_of_2(top_k),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- public


def _outputs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = logits.shape[0] if logits.dim() == 2 else 0
    K = max(top_k, 0)  # a bad top_k is reported by the launcher's checks
    ids = torch.empty((T, K), dtype=torch.int64, device=logits.device)  # [T, K]
    weights = torch.empty((T, K), dtype=torch.float32, device=logits.device)  # [T, K]
    return ids, weights


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> (ids [T, K] int64, weights [T, K] float32), sorted by weight, descending;
    softmax_topk_reference's contract (Mixtral: renormalize; Qwen-MoE, OLMoE: norm_topk_prob)."""
    ids, weights = _outputs(logits, top_k)
    softmax_topk_into(logits, top_k, renormalize, ids, weights)
    return ids, weights


def grouped_sigmoid_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing; grouped_sigmoid_topk_reference's contract.

    logits: [T, E]; bias: [E] float32 (e_score_correction_bias); n_group groups of E / n_group
    experts, the best topk_group groups kept; renormalize: norm_topk_prob; scaling:
    routed_scaling_factor. Returns (ids [T, K] int64, weights [T, K] float32), sorted by choice
    score, descending.
    """
    ids, weights = _outputs(logits, top_k)
    grouped_sigmoid_topk_into(logits, bias, top_k, n_group, topk_group, renormalize, scaling, ids, weights)
    return ids, weights
