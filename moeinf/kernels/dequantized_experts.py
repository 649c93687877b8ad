"""Quantized routed experts for prefill-sized steps on the CPU: the routed experts' int8 / int4 slots
dequantized to float32 a chunk of experts at a time (host_quant_experts.dequantize_slots: parallel,
bit for bit quantize.dequantize's values), then the float grouped matmuls (grouped_experts.py) over
the chunk's (token, expert) pairs.

Many tokens per expert make the matmuls compute-bound, so a float32 copy of the weights, made
once per step and reused by every token, costs less than dequantizing in the inner loop for each
tile of tokens (the decode kernels' way). A chunk holds at most CHUNK_BYTES of float32 weights (at
least one expert), which bounds the copy for models whose layer of experts is gigabytes (Mixtral:
704 MB an expert in float32).

Each pair's weighted output w_tk * expert_k(x_t) is computed alone (a one-expert row of the grouped
path), and each token's K outputs are summed over k at the end, as moe_experts_reference sums
them, so the result does not depend on the chunking nor on which slot holds which expert:
resident and offloaded runs agree bit for bit. Against quantized_moe_experts_reference: the same
weights and order of the combine; the matmuls' summation order differs (tolerance.py's float32).
"""

from __future__ import annotations

import torch

from moeinf.kernels import grouped_experts
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.host_quant_experts import dequantize_slots
from moeinf.kernels.quantize import QuantizedMatrix
from moeinf.kernels.reference import moe_experts_reference

CHUNK_BYTES = 512 * 2**20  # float32 weights dequantized at once


def dequantized_moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: QuantizedMatrix,
    w2: QuantizedMatrix,
    expert_slots: torch.Tensor,
    *,
    activation: ExpertActivation = SILU,
    input_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """quantized_moe_experts_reference's contract (quantize.py) on the CPU: x [T, D], topk_ids and
    topk_weights [T, K], w13 [S, 2F, D] and w2 [S, D, F] quantized, expert_slots [E], input_perm
    [S, D] or None -> [T, D] float32."""
    T, K = topk_ids.shape
    D = x.shape[1]
    x = x.to(torch.float32)
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    flat_weights = topk_weights.reshape(-1, 1).to(torch.float32)  # [T*K, 1]
    routed = torch.unique(flat_ids)  # [A] ascending
    (F2, _), F = w13.shape[1:], w2.shape[-1]
    per_expert = 4 * (F2 * D + D * F)
    chunk = max(1, CHUNK_BYTES // per_expert)
    products = torch.empty((T * K, D), dtype=torch.float32)  # [T*K, D] each pair's weighted output
    for start in range(0, routed.shape[0], chunk):
        experts = routed[start : start + chunk]  # [U]
        slots = expert_slots[experts]
        gate_up = dequantize_slots(w13, slots)  # [U, 2F, D]
        if input_perm is not None:  # act order: w13 packs W13[:, perm]; its columns go back in place
            packed, gate_up = gate_up, torch.empty_like(gate_up)
            for u, slot in enumerate(slots.tolist()):
                gate_up[u][:, input_perm[slot].long()] = packed[u]
        down = dequantize_slots(w2, slots)  # [U, D, F]
        local = torch.full_like(expert_slots, -1)
        local[experts] = torch.arange(experts.shape[0])  # [E] each chunk expert's row of gate_up / down
        pairs = torch.isin(flat_ids, experts).nonzero().squeeze(1)  # [P] the chunk's pairs
        rows = x[pairs // K]  # [P, D] each pair's token, a one-expert row of its own
        args = (rows, flat_ids[pairs, None], flat_weights[pairs], gate_up, down, local)
        if grouped_experts.applies(rows, gate_up, down):
            products[pairs] = grouped_experts.moe_experts_grouped(*args, activation=activation)
        else:
            products[pairs] = moe_experts_reference(*args, activation=activation)
    return products.view(T, K, D).sum(dim=1)
