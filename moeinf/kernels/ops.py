"""The ops the runtime calls, and which implementation runs them.

`Kernels("auto")` (the default) runs the Triton kernels on CUDA tensors and their torch versions
elsewhere. `Kernels("triton")` always runs the kernels: on CPU tensors that works only in the
Triton interpreter (TRITON_INTERPRET=1 set before triton is imported), which is how tests check
the runtime's use of the kernels without a GPU. `Kernels("torch")` always runs the torch versions:
the baseline the kernels are measured against on CUDA. The torch versions are the references,
except on the CPU for decode-sized steps (up to 32 tokens): the routed experts run the host expert
kernels (host_experts.py: float32 and bfloat16 weights read at memory bandwidth, the reference's
arithmetic in another summation order), and the residual add with its RMSNorm (host_norm.py) and
attention (host_attention.py; in bfloat16 for decode steps proper, one new token per sequence)
run one compiled call each instead of a layer's worth of small torch ops; larger steps run the
experts as two grouped matmuls (grouped_experts.py: equal to the reference up to a vectorised
sigmoid's last bit, and faster). Quantized experts (int8 / int4 records, kernels/quantize.py) run
host_quant_experts.py's kernels on the CPU for decode-sized steps, larger CPU steps dequantize
the routed experts in chunks for the grouped matmuls (dequantized_experts.py); with Triton they run quant_moe.py's fused kernel (w8a16 / w4a16), and
kernels="torch" runs the torch reference on dequantized experts.
The Triton modules are imported on first use: importing triton takes about a second, and nothing
on a CPU run needs it.
"""

from __future__ import annotations

import torch

from moeinf.kernels import (
    dequantized_experts,
    grouped_experts,
    host_attention,
    host_experts,
    host_norm,
    host_quant_experts,
    hybrid_experts,
)
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.quantize import QuantizedMatrix, quantized_moe_experts_reference
from moeinf.kernels.reference import (
    grouped_sigmoid_topk_reference,
    moe_experts_reference,
    rms_norm_reference,
    softmax_topk_reference,
)

KERNEL_CHOICES = ("auto", "triton", "torch")


class Kernels:
    """Dispatches each op to its Triton kernel or its torch reference (see the module docstring)."""

    def __init__(self, choice: str = "auto"):
        if choice not in KERNEL_CHOICES:
            raise ValueError(f"expected kernels one of {', '.join(KERNEL_CHOICES)}; found {choice!r}")
        self.choice = choice

    def __repr__(self) -> str:
        return f"Kernels({self.choice!r})"

    def uses_triton(self, x: torch.Tensor) -> bool:
        return self.choice == "triton" or (self.choice == "auto" and x.is_cuda)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, scale_in_fp32: bool = False) -> torch.Tensor:
        # x: [..., D]; scale_in_fp32: the weight scales the float32 rows before they are rounded (GPT-OSS)
        if self.uses_triton(x):
            from moeinf.kernels import norm

            return norm.rms_norm(x, weight, eps, scale_in_fp32=scale_in_fp32)
        return rms_norm_reference(x, weight, eps, scale_in_fp32)

    def add_rms_norm(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        scale_in_fp32: bool = False,
        *,
        most_new_tokens: int,
    ) -> torch.Tensor:
        # h: [T, D] += y [T, D] in place (the residual stream); returns rms_norm(h) [T, D];
        # most_new_tokens: the most new tokens one sequence of the step has
        if self.choice == "auto" and host_norm.applies(h, y, weight, most_new_tokens):
            return host_norm.add_rms_norm_unchecked(h, y, weight, eps, scale_in_fp32)
        h.add_(y)
        return self.rms_norm(h, weight, eps, scale_in_fp32)

    def attends_on_host(self, qkv: torch.Tensor, k_cache: torch.Tensor, most_new_tokens: int) -> bool:
        # whether host_attention.attend_decode runs this step (qkv: [T, ...]; k_cache: [L, Hkv, C, Dh];
        # most_new_tokens: the most new tokens one sequence of the step has)
        return self.choice == "auto" and host_attention.applies(qkv, k_cache, most_new_tokens)

    def softmax_topk(self, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # logits: [T, E] -> ids [T, K] int64, weights [T, K] float32
        if self.uses_triton(logits):
            from moeinf.kernels import routing

            return routing.softmax_topk(logits, top_k, renormalize)
        return softmax_topk_reference(logits, top_k, renormalize)

    def grouped_sigmoid_topk(
        self,
        logits: torch.Tensor,
        bias: torch.Tensor,
        top_k: int,
        n_group: int,
        topk_group: int,
        renormalize: bool,
        scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # logits: [T, E], bias: [E] -> ids [T, K] int64, weights [T, K] float32
        if self.uses_triton(logits):
            from moeinf.kernels import routing

            return routing.grouped_sigmoid_topk(logits, bias, top_k, n_group, topk_group, renormalize, scaling)
        return grouped_sigmoid_topk_reference(logits, bias, top_k, n_group, topk_group, renormalize, scaling)

    def moe_experts(
        self,
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
        host: host_experts.SecondBuffers | None = None,
        input_perm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: [T, D]; w13: [S, 2F, D]; w2: [S, D, F]; expert_slots: [E] -> [T, D]
        # b13: [S, 2F], b2: [S, D] per-slot biases (both or neither); activation of (gate, up)
        # host: experts read from the host tier's records instead (hybrid execution): with Triton the
        # device computes the rest beside them (kernels/hybrid_experts.py), else the host kernels all
        # w13, w2 may be QuantizedMatrix (int8 / int4 records), input_perm [S, D] their act order
        if isinstance(w13, QuantizedMatrix):
            if b13 is not None or b2 is not None:
                raise ValueError("quantized experts: expected no expert biases, found b13 / b2")
            return self._quantized_experts(
                x, topk_ids, topk_weights, w13, w2, expert_slots, activation, host, input_perm
            )
        extras = dict(b13=b13, b2=b2, activation=activation)
        if host is not None and self.uses_triton(x):  # the device's share in Triton, the host's beside it
            return hybrid_experts.hybrid_moe_experts(x, topk_ids, topk_weights, w13, w2, expert_slots, host, **extras)
        if host is not None and x.device.type != "cpu":  # kernels "torch" on CUDA: the device's share in torch
            return hybrid_experts.hybrid_moe_experts(
                x, topk_ids, topk_weights, w13, w2, expert_slots, host, **extras, triton=False
            )
        if host is not None:
            if not host_experts.applies(x, w13, w2, b13, b2):
                raise ValueError(
                    f"experts computed from the host tier need the host expert kernels: CPU {host_experts.DTYPES} "
                    f"steps of <= {host_experts.MAX_TOKENS} tokens, found {x.device} {x.dtype} [{x.shape[0]} tokens]"
                )
            return host_experts.host_moe_experts(
                x, topk_ids, topk_weights, w13, w2, expert_slots, **extras, second=host
            )
        if self.uses_triton(x):
            from moeinf.kernels import moe

            # the kernels weigh and combine in float32 whatever dtype the weights came in
            return moe.fused_moe(x, topk_ids, topk_weights.float(), w13, w2, expert_slots, **extras)
        if self.choice == "auto" and host_experts.applies(x, w13, w2, b13, b2):
            return host_experts.host_moe_experts(x, topk_ids, topk_weights, w13, w2, expert_slots, **extras)
        if grouped_experts.applies(x, w13, w2):
            return grouped_experts.moe_experts_grouped(x, topk_ids, topk_weights, w13, w2, expert_slots, **extras)
        return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, expert_slots, **extras)

    def _quantized_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        w13: QuantizedMatrix,
        w2: QuantizedMatrix,
        expert_slots: torch.Tensor,
        activation: ExpertActivation,
        host: host_experts.SecondBuffers | None,
        input_perm: torch.Tensor | None,
    ) -> torch.Tensor:
        """Routed experts from int8 / int4 weights: on the CPU the host kernels for decode-sized
        steps (float32 arithmetic whatever x's dtype: x is widened, the sum rounded to it once)
        and dequantized chunks for larger ones; with Triton (CUDA) the quantized fused kernel
        (quant_moe.py), the host tier's share beside it where the placement put experts there;
        the torch reference on dequantized experts otherwise."""
        decode_on_cpu = x.device.type == "cpu" and x.shape[0] <= host_quant_experts.MAX_TOKENS
        # the host tier's records need the host kernels, as for float experts, whatever the choice
        if decode_on_cpu and (self.choice == "auto" or host is not None and not self.uses_triton(x)):
            y = host_quant_experts.host_quant_moe_experts(
                x.float(), topk_ids, topk_weights, w13, w2, expert_slots, activation=activation,
                input_perm=input_perm, second=host,
            )  # fmt: skip
            return y.to(x.dtype)
        if host is not None and (x.device.type != "cpu" or self.uses_triton(x)):
            return hybrid_experts.hybrid_moe_experts(
                x, topk_ids, topk_weights, w13, w2, expert_slots, host, activation=activation, input_perm=input_perm,
                triton=self.uses_triton(x),
            )  # fmt: skip
        if self.uses_triton(x):
            from moeinf.kernels import quant_moe

            return quant_moe.fused_quant_moe(
                x, topk_ids, topk_weights.float(), w13, w2, expert_slots, activation=activation, input_perm=input_perm
            )
        if host is not None:
            raise ValueError(
                f"quantized experts computed from the host tier need the host kernels: CPU steps of <= "
                f"{host_quant_experts.MAX_TOKENS} tokens with kernels 'auto', found {x.device} [{x.shape[0]} tokens], "
                f"kernels {self.choice!r}"
            )
        if self.choice == "auto" and x.device.type == "cpu":  # prefill: dequantized chunks, grouped matmuls
            y = dequantized_experts.dequantized_moe_experts(
                x, topk_ids, topk_weights, w13, w2, expert_slots, activation=activation, input_perm=input_perm
            )
            return y.to(x.dtype)
        y = quantized_moe_experts_reference(
            x, topk_ids, topk_weights, w13, w2, expert_slots, activation=activation, input_perm=input_perm
        )
        return y.to(x.dtype)


AUTO = Kernels("auto")  # immutable: Triton on CUDA, torch elsewhere
