"""The routed experts as two grouped matmuls: the torch fast path for two tokens or more on the CPU.

moe_experts_reference loops over the experts in Python, two small GEMMs each; with many experts
and a prompt's worth of tokens that loop, not the arithmetic, sets the time. Here the (token,
expert) pairs are sorted by the slot that holds their expert, so that torch._grouped_mm can run
every expert's gate/up GEMM in one call and every down GEMM in another, reading the weights
straight out of the slot arrays (w13 [S, 2F, D], w2 [S, D, F], all S slots as groups; a slot
without pairs is an empty group). Biases, the activation and the routing weights apply to the
pairs in expert order, and the combine sums each token's K weighted outputs over k, as the
reference does, so the result does not depend on which slot holds which expert: an offloaded run
equals the resident one bit for bit, as with the reference.

On the CPU a group's product equals F.linear over the same rows (both add biases after the
product), so the output equals moe_experts_reference's up to the last bit of a vectorised
transcendental (the activation runs over all pairs at once, the reference's per expert).
"""

from __future__ import annotations

import torch

from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.reference import expect_both_biases_or_neither

# torch._grouped_mm is private: where a torch lacks it, the reference loop runs instead
AVAILABLE = hasattr(torch, "_grouped_mm")
# for one token the loop is faster (0.7-0.9x: the grouped call walks all S groups for K pairs);
# from two tokens the grouped calls are (1.0-1.5x at 2 tokens, 1.3-2.8x at 16; 2-core x86, torch 2.13)
MIN_TOKENS = 2


def applies(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether this path runs these inputs: CPU tensors, two tokens or more, and rows a multiple of
    16 bytes (torch._grouped_mm's stride rule: D and F x itemsize; true of real models' shapes)."""
    row_bytes = (x.shape[-1] * x.element_size(), w2.shape[-1] * w2.element_size())
    return AVAILABLE and x.device.type == "cpu" and x.shape[0] >= MIN_TOKENS and all(b % 16 == 0 for b in row_bytes)


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    """[P] -> [P]: the permutation that undoes `permutation` (inverse[permutation[i]] = i)."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.shape[0], device=permutation.device)
    return inverse


def moe_experts_grouped(
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
    """moe_experts_reference's contract (see there): x [T, D] -> [T, D] in x's dtype."""
    expect_both_biases_or_neither("moe_experts_grouped", b13, b2)
    T, K = topk_ids.shape
    S, ffn = w13.shape[0], w2.shape[-1]
    flat_ids = topk_ids.reshape(-1)  # [P = T*K]
    by_expert = torch.argsort(flat_ids, stable=True)  # [P] pairs in expert order: the same for any slot layout
    pair_slots = expert_slots[flat_ids[by_expert]]  # [P] slot of each pair, in expert order
    to_slot_order = torch.argsort(pair_slots, stable=True)  # [P] whole groups reordered by slot
    offs = torch.cumsum(torch.bincount(pair_slots, minlength=S), 0).to(torch.int32)  # [S] end of each group
    # The GEMMs take rows grouped by slot; everything element-wise runs in expert order, so that a
    # vectorised transcendental sees each element at the same place whatever slot holds its expert.
    # Rows move between the orders by gathers (index_select, cheaper than scatters); where slots
    # ascend with expert ids (all experts resident) the two orders are one and nothing moves.
    reordered = bool((pair_slots[1:] < pair_slots[:-1]).any())
    from_slot_order = _inverse(to_slot_order)  # [P] slot-order row of each expert-order row

    def to_slots(rows: torch.Tensor) -> torch.Tensor:
        return rows.index_select(0, to_slot_order) if reordered else rows

    def from_slots(rows: torch.Tensor) -> torch.Tensor:
        return rows.index_select(0, from_slot_order) if reordered else rows

    gate_up = from_slots(torch._grouped_mm(to_slots(x[by_expert // K]), w13.transpose(1, 2), offs=offs))
    if b13 is not None:
        gate_up = gate_up + b13[pair_slots]
    act = activation(*gate_up.split(ffn, dim=-1))  # [P, F] in expert order
    y = from_slots(torch._grouped_mm(to_slots(act), w2.transpose(1, 2), offs=offs))  # [P, D] in expert order
    if b2 is not None:
        y = y + b2[pair_slots]
    y = y * topk_weights.reshape(-1)[by_expert, None]  # [P, D] weighted, in the promoted dtype
    products = y.index_select(0, _inverse(by_expert))  # [P, D] back in (token, k) order
    return products.view(T, K, -1).sum(dim=1).to(x.dtype)  # the reference's combine
