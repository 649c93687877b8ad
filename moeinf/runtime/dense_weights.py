"""The dense (non-routed) weights, resident on the compute device for the whole run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from moeinf.loaders.checkpoint import Checkpoint
from moeinf.models.mla import MLAWeights


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    o_proj: torch.Tensor  # [D, attn_out_dim]
    ffn_norm: torch.Tensor  # [D]
    qkv: torch.Tensor | None = None  # [q_dim + 2 kv_dim, D]: q, k, v projections in one GEMM
    mla: MLAWeights | None = None  # in place of qkv under multi-head latent attention
    sinks: torch.Tensor | None = None  # [H] attention sink logits (GPT-OSS)
    attn_norm_bias: torch.Tensor | None = None  # [D]; LayerNorm families only
    ffn_norm_bias: torch.Tensor | None = None  # [D]
    qkv_bias: torch.Tensor | None = None  # [q_dim + 2 kv_dim]
    o_bias: torch.Tensor | None = None  # [D]
    q_norm: torch.Tensor | None = None  # [head_dim] or [q_dim], as spec.qk_norm says
    k_norm: torch.Tensor | None = None  # [head_dim] or [kv_dim]
    moe_index: int | None = None  # position among the MoE layers; None: a dense MLP layer
    router: torch.Tensor | None = None  # [E, D]; float32 where spec.router_fp32
    router_bias: torch.Tensor | None = None  # [E]
    router_correction_bias: torch.Tensor | None = None  # [E] float32, DeepSeek-V3's e_score_correction_bias
    shared_w13: torch.Tensor | None = None  # [2 Fs, D]: the shared expert's gate, up
    shared_w2: torch.Tensor | None = None  # [D, Fs]
    shared_gate: torch.Tensor | None = None  # [1, D]
    mlp_w13: torch.Tensor | None = None  # [2 Fd, D]: a dense layer's gate, up
    mlp_w2: torch.Tensor | None = None  # [D, Fd]


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, D]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]; the embedding itself when tied
    layers: list[LayerWeights]
    final_norm_bias: torch.Tensor | None = None  # [D]; LayerNorm families only
    lm_head_bias: torch.Tensor | None = None  # [V]

    @classmethod
    def load(
        cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, progress: bool = True
    ) -> DenseWeights:
        spec = checkpoint.spec

        def read(role: str, layer: int | None = None, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            return checkpoint.read(role, layer).to(device=device, dtype=as_dtype)

        def cat(roles: tuple[str, ...], layer: int) -> torch.Tensor:
            return torch.cat([read(role, layer) for role in roles])

        layers = []
        for layer in tqdm(range(spec.num_layers), desc="dense weights", unit="layer", disable=not progress):
            roles = set(checkpoint.family.layer_roles(spec, layer))
            lw = LayerWeights(
                attn_norm=read("attn_norm", layer), o_proj=read("o_proj", layer), ffn_norm=read("ffn_norm", layer)
            )
            if "kv_a_proj" in roles:
                lw.mla = MLAWeights(
                    kv_a=read("kv_a_proj", layer), kv_a_norm=read("kv_a_norm", layer), kv_b=read("kv_b_proj", layer)
                )
                if "q_proj" in roles:
                    lw.mla.q = read("q_proj", layer)
                else:
                    lw.mla.q_a, lw.mla.q_a_norm = read("q_a_proj", layer), read("q_a_norm", layer)
                    lw.mla.q_b = read("q_b_proj", layer)
            else:
                lw.qkv = cat(("q_proj", "k_proj", "v_proj"), layer)
            if "sinks" in roles:
                lw.sinks = read("sinks", layer)
            if "attn_norm_bias" in roles:
                lw.attn_norm_bias, lw.ffn_norm_bias = read("attn_norm_bias", layer), read("ffn_norm_bias", layer)
            if "q_bias" in roles:
                lw.qkv_bias = cat(("q_bias", "k_bias", "v_bias"), layer)
            if "o_bias" in roles:
                lw.o_bias = read("o_bias", layer)
            if "q_norm" in roles:
                lw.q_norm, lw.k_norm = read("q_norm", layer), read("k_norm", layer)
            if "router" in roles:
                lw.moe_index = spec.moe_layers.index(layer)
                lw.router = read("router", layer, torch.float32 if spec.router_fp32 else dtype)
            if "router_bias" in roles:
                lw.router_bias = read("router_bias", layer)
            if "router_correction_bias" in roles:
                lw.router_correction_bias = read("router_correction_bias", layer, torch.float32)
            if "shared_gate" in roles:
                lw.shared_w13 = cat(("shared_gate", "shared_up"), layer)
                lw.shared_w2 = read("shared_down", layer)
            if "shared_expert_gate" in roles:
                lw.shared_gate = read("shared_expert_gate", layer)
            if "mlp_gate" in roles:
                lw.mlp_w13 = cat(("mlp_gate", "mlp_up"), layer)
                lw.mlp_w2 = read("mlp_down", layer)
            layers.append(lw)
        embed = read("embed")
        lm_head = embed if spec.tie_word_embeddings else read("lm_head")
        global_roles = set(checkpoint.family.global_roles(spec))
        return cls(
            embed=embed,
            final_norm=read("final_norm"),
            lm_head=lm_head,
            layers=layers,
            final_norm_bias=read("final_norm_bias") if "final_norm_bias" in global_roles else None,
            lm_head_bias=read("lm_head_bias") if "lm_head_bias" in global_roles else None,
        )

    def layer_params(self, layer: int) -> int:
        """Parameters of one layer's resident weights (attention, norms, router, shared or dense MLP)."""
        lw = self.layers[layer]
        parts = [vars(lw)] + ([vars(lw.mla)] if lw.mla is not None else [])
        return sum(t.numel() for part in parts for t in part.values() if isinstance(t, torch.Tensor))

    def head_params(self) -> int:
        """Parameters the last step reads once per token after the layers: final norm and lm head."""
        tensors = (self.final_norm, self.lm_head, self.final_norm_bias, self.lm_head_bias)
        return sum(t.numel() for t in tensors if t is not None)
