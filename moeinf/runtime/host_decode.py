"""What the host decode block (kernels/host_decode_block.py) reads, prepared once per model: the
dense weights of every layer as arrays sharing the tensors' memory, and, where every expert is
resident, the expert slot buffers as the host expert kernels take them. The executor's
_decode_block_layers runs a decode step from these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeinf.kernels import host_attention, host_decode_block, host_experts
from moeinf.kernels.bf16_bits import as_numpy
from moeinf.kernels.ops import Kernels
from moeinf.kernels.quantize import QuantizedMatrix
from moeinf.models.spec import ModelSpec
from moeinf.runtime.dense_weights import DenseWeights
from moeinf.runtime.experts.resident import ResidentExperts
from moeinf.runtime.experts.source import ExpertSource


@dataclass(frozen=True)
class HostDecodeWeights:
    """The dense side of every layer, for host_decode_block's calls."""

    layers: list[
        tuple[np.ndarray, ...]
    ]  # per layer (attn_norm [D], qkv [N, D], o_proj [D, A], ffn_norm [D], router [E, D])
    final_norm: np.ndarray  # [D]
    windows: np.ndarray  # [L] int64 each layer's attention window (host_attention.NO_WINDOW: none)
    attention: tuple[np.float32, int, int, int]  # (scale, heads, kv_heads, head_dim) as attend_rows takes them
    by_kind: tuple[tuple[np.ndarray, ...], ...]  # layers regrouped: (attn_norms, qkvs, ...), each over the layers

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        dense: DenseWeights,
        device: torch.device,
        dtype: torch.dtype,
        kernels: Kernels,
        plain_attention: bool,
    ) -> HostDecodeWeights | None:
        """The arrays, where host_decode_block can run the model's decode steps: on the CPU in float32
        or bfloat16 with kernels "auto", attention the host kernel runs (plain_attention), RMSNorm,
        softmax top-k routing, and every layer a MoE layer without a shared expert or projection
        biases; None elsewhere."""
        if not (
            device.type == "cpu"
            and dtype in host_decode_block.DTYPES
            and kernels.choice == "auto"
            and plain_attention
            and spec.norm_type == "rms"
            and spec.routing == "softmax_topk"
            and all(
                lw.moe_index is not None
                and lw.shared_w13 is None
                and lw.qkv_bias is None
                and lw.o_bias is None
                and lw.router_bias is None
                and lw.sinks is None
                for lw in dense.layers
            )
        ):
            return None
        scale = np.float32(spec.head_dim**-0.5 if spec.attention_scale is None else spec.attention_scale)
        windows = [spec.window(layer) for layer in range(spec.num_layers)]
        layers = [
            tuple(as_numpy(t.contiguous()) for t in (lw.attn_norm, lw.qkv, lw.o_proj, lw.ffn_norm, lw.router))
            for lw in dense.layers
        ]
        return cls(
            layers=layers,
            by_kind=tuple(zip(*layers)),
            final_norm=as_numpy(dense.final_norm.contiguous()),
            windows=np.array([host_attention.NO_WINDOW if w is None else w for w in windows], np.int64),
            attention=(scale, spec.num_heads, spec.num_kv_heads, spec.head_dim),
        )


@dataclass(frozen=True)
class ResidentBlockExperts:
    """Resident experts as host_decode_block.route_experts_project takes them."""

    slots: np.ndarray  # [L, E] int64 the slot of each expert of each MoE layer
    buffers: tuple  # (w13, w2, stand-in bias) of host_experts.slot_buffers, then F
    activation: tuple[int, np.float32, np.float32]  # host_experts.ACTIVATIONS code, alpha, limit

    @classmethod
    def build(cls, spec: ModelSpec, experts: ExpertSource, dtype: torch.dtype) -> ResidentBlockExperts | None:
        """Every expert resident in float slot buffers of `dtype` that the host expert kernels read,
        without biases: host_decode_block then computes each layer's experts in the call that routes
        them. None for any other source (an expert pool, quantized records, biases)."""
        if not (
            isinstance(experts, ResidentExperts)
            and not isinstance(experts.w13, QuantizedMatrix)
            and experts.b13 is None
            and experts.w13.dtype == experts.w2.dtype == dtype
            and host_experts.applies(experts.w13[0, :1], experts.w13, experts.w2)
        ):
            return None
        activation = spec.expert_activation
        return cls(
            slots=experts.slot_table.numpy(),
            buffers=(*host_experts.slot_buffers(experts.w13, experts.w2), spec.expert_ffn),
            activation=(
                host_experts.ACTIVATIONS[activation.kind],
                np.float32(activation.alpha),
                np.float32(activation.limit),
            ),
        )
