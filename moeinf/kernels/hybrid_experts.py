"""One MoE layer split between a device and the host, where they are different memories (CUDA, or
Triton's interpreter in tests): the experts in device slots run in the device kernels, those whose
slot is HOST_SLOT on the host kernels, straight from the host tier's records. Activations cross
the link (the routed tokens to the host, their [T, D] sum back), never weights.

    host share    out_host[t] = sum over t's pairs (t, k) with slot HOST_SLOT, in k order, of
                  w_tk * expert_k(x_t)                       host kernels, float32 [T, D]
    device share  out_dev[t]  = the same over the pairs in slots  (fused_moe, host_share: x's dtype;
                  with kernels "torch", moe_experts_reference pair by pair: device_share_torch)
    out = out_dev + out_host, rounded to x's dtype

Quantized records (QuantizedMatrix w13 / w2) split the same way: quant_moe.fused_quant_moe on the
device, host_quant_experts on the host.

The host share is issued first, on the worker given (SecondBuffers.worker, else inline), and the
device's kernels are queued while it runs; the two are added in that fixed order, so a run is
deterministic. Host-computed experts round differently from the same experts in slots (the host
kernels' float32 sums, and one more rounding where x is bfloat16): compare with a resident run
within the dtype's tolerance.
"""

from __future__ import annotations

import torch

from moeinf.kernels import host_experts, host_quant_experts
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.host_experts import SecondBuffers
from moeinf.kernels.quantize import QuantizedMatrix, quantized_moe_experts_reference
from moeinf.kernels.reference import moe_experts_reference


def host_share(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    host: SecondBuffers,
    activation: ExpertActivation = SILU,
) -> torch.Tensor:
    """x: [T, D], topk_ids, topk_weights: [T, K], all on the CPU -> [T, D] float32: the pairs whose
    expert host.slots places in the host buffers, each weighted, summed per token in (t, k) order."""
    T, D = x.shape
    out = torch.zeros((T, D), dtype=torch.float32)
    on_host = host.slots[topk_ids] >= 0  # [T, K]
    tokens, ks = on_host.nonzero(as_tuple=True)  # [P] the host's pairs, token-major
    if tokens.numel() == 0:
        return out
    ids = topk_ids[tokens, ks][:, None]  # [P, 1]: each pair a one-expert "token" of its own
    weights = topk_weights[tokens, ks][:, None]  # [P, 1]
    rows = x[tokens]  # [P, D]
    step = host_experts.MAX_TOKENS
    for start in range(0, tokens.numel(), step):
        chunk = slice(start, start + step)
        if isinstance(host.w13, QuantizedMatrix):  # quantized records: float32 in, float32 out
            products = host_quant_experts.host_quant_moe_experts(
                rows[chunk].float(), ids[chunk], weights[chunk], host.w13, host.w2, host.slots,
                activation=activation, input_perm=host.input_perm,
            )  # fmt: skip
        else:
            products = host_experts.host_moe_experts(
                rows[chunk], ids[chunk], weights[chunk], host.w13, host.w2, host.slots,
                b13=host.b13, b2=host.b2, activation=activation,
            )  # fmt: skip
        out.index_add_(0, tokens[chunk], products.float())
    return out


def hybrid_moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_slots: torch.Tensor,
    host: SecondBuffers,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ExpertActivation = SILU,
    triton: bool = True,
    input_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """moe_experts_reference's contract with the experts split (see the module docstring): x [T, D]
    and the slot buffers on the device, expert_slots [E] with HOST_SLOT for host.slots' experts.
    Returns [T, D] in x's dtype on x's device. triton False: the device share in torch
    (device_share_torch), the baseline kernels="torch" runs."""
    x_host, ids_host, weights_host = x.cpu(), topk_ids.cpu(), topk_weights.cpu()
    job = (x_host, ids_host, weights_host, host, activation)
    pending = host.worker.submit(host_share, *job) if host.worker is not None else None
    extras = dict(b13=b13, b2=b2, activation=activation)
    quantized = isinstance(w13, QuantizedMatrix)
    if quantized:  # int8 / int4 records: no biases, maybe an input order
        extras = dict(activation=activation, input_perm=input_perm)
    if triton:
        from moeinf.kernels import moe, quant_moe  # Triton: imported where it runs

        # the slot table marks the host's experts; the routing and the tokens cross to the host once
        expert_slots = torch.where(host.slots.to(expert_slots.device) >= 0, moe.HOST_SLOT, expert_slots)
        kernel = quant_moe.fused_quant_moe if quantized else moe.fused_moe
        device = kernel(x, topk_ids, topk_weights.float(), w13, w2, expert_slots, **extras, host_share=True)
    else:
        device = device_share_torch(x, topk_ids, topk_weights, w13, w2, expert_slots, host, **extras)
    shared = pending.result() if pending is not None else host_share(*job)
    return (device.float() + shared.to(x.device)).to(x.dtype)


def device_share_torch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_slots: torch.Tensor,
    host: SecondBuffers,
    **extras,
) -> torch.Tensor:
    """The device share in torch: x [T, D] -> [T, D] float32, the pairs whose expert sits in a slot
    (not in host.slots), each a one-expert row of moe_experts_reference, weighted and added per
    token in (t, k) order (the host's pairs never touch a slot: theirs hold another expert)."""
    T, D = x.shape
    out = torch.zeros((T, D), dtype=torch.float32, device=x.device)
    in_slots = host.slots.to(x.device)[topk_ids] < 0  # [T, K]
    tokens, ks = in_slots.nonzero(as_tuple=True)  # [P] the device's pairs, token-major
    if tokens.numel() == 0:
        return out
    reference = quantized_moe_experts_reference if isinstance(w13, QuantizedMatrix) else moe_experts_reference
    products = reference(
        x[tokens], topk_ids[tokens, ks][:, None], topk_weights[tokens, ks][:, None].float(), w13, w2, expert_slots,
        **extras,
    )  # fmt: skip  # [P, D]
    return out.index_add_(0, tokens, products.float())
