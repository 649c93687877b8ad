"""Family: what one model architecture is, as data — its tensor names, their shapes, its config.

A tensor name pattern may hold `{layer}` and `{expert}`; a shape is a tuple of ModelSpec attribute
names (or literal ints), so the loader can check every tensor on disk against the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from moeinf.kernels.fp8 import FP8_DTYPE
from moeinf.models.spec import ModelSpec

Shape = tuple[str | int, ...]

# The shape of every role, in ModelSpec attribute names; families whose tensors differ override
# entries (OLMoE's full-width q/k norms).
ROLE_SHAPES: dict[str, Shape] = {
    "embed": ("vocab_size", "hidden_size"),
    "final_norm": ("hidden_size",),
    "lm_head": ("vocab_size", "hidden_size"),
    "attn_norm": ("hidden_size",),
    "q_proj": ("q_dim", "hidden_size"),
    "k_proj": ("kv_dim", "hidden_size"),
    "v_proj": ("kv_dim", "hidden_size"),
    "o_proj": ("hidden_size", "attn_out_dim"),
    "q_bias": ("q_dim",),
    "k_bias": ("kv_dim",),
    "v_bias": ("kv_dim",),
    "q_norm": ("head_dim",),  # per-head norms (Qwen3)
    "k_norm": ("head_dim",),
    "ffn_norm": ("hidden_size",),
    "router": ("num_experts", "hidden_size"),
    "expert_gate": ("expert_ffn", "hidden_size"),
    "expert_up": ("expert_ffn", "hidden_size"),
    "expert_down": ("hidden_size", "expert_ffn"),
    "shared_gate": ("shared_expert_ffn", "hidden_size"),
    "shared_up": ("shared_expert_ffn", "hidden_size"),
    "shared_down": ("hidden_size", "shared_expert_ffn"),
    "shared_expert_gate": (1, "hidden_size"),
    "mlp_gate": ("dense_ffn", "hidden_size"),
    "mlp_up": ("dense_ffn", "hidden_size"),
    "mlp_down": ("hidden_size", "dense_ffn"),
    "final_norm_bias": ("hidden_size",),
    "lm_head_bias": ("vocab_size",),
    "attn_norm_bias": ("hidden_size",),
    "ffn_norm_bias": ("hidden_size",),
    "o_bias": ("hidden_size",),
    # multi-head latent attention (DeepSeek)
    "q_a_proj": ("q_lora_rank", "hidden_size"),
    "q_a_norm": ("q_lora_rank",),
    "q_b_proj": ("q_dim", "q_lora_rank"),
    "kv_a_proj": ("kv_a_dim", "hidden_size"),
    "kv_a_norm": ("kv_lora_rank",),
    "kv_b_proj": ("kv_b_dim", "kv_lora_rank"),
    "sinks": ("num_heads",),  # GPT-OSS attention sinks
    "router_bias": ("num_experts",),
    "router_correction_bias": ("num_experts",),
    # one tensor per layer for all experts (GPT-OSS): x @ gate_up, gate and up interleaved on the last dim
    "experts_gate_up": ("num_experts", "hidden_size", "gate_up_dim"),
    "experts_gate_up_bias": ("num_experts", "gate_up_dim"),
    "experts_down": ("num_experts", "expert_ffn", "hidden_size"),
    "experts_down_bias": ("num_experts", "hidden_size"),
    # the same, MXFP4-packed (kernels/mxfp4.py): [E, rows, blocks of 32, 16 bytes] and a scale per block,
    # rows in the slot layout's orientation (gate and up rows interleaved)
    "experts_gate_up_blocks": ("num_experts", "gate_up_dim", "hidden_blocks", 16),
    "experts_gate_up_scales": ("num_experts", "gate_up_dim", "hidden_blocks"),
    "experts_down_blocks": ("num_experts", "hidden_size", "ffn_blocks", 16),
    "experts_down_scales": ("num_experts", "hidden_size", "ffn_blocks"),
}

# The names every family here shares (the Llama layout transformers writes); families add the rest.
_LAYER = "model.layers.{layer}"
DECODER_TENSOR_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": f"{_LAYER}.input_layernorm.weight",
    "q_proj": f"{_LAYER}.self_attn.q_proj.weight",
    "k_proj": f"{_LAYER}.self_attn.k_proj.weight",
    "v_proj": f"{_LAYER}.self_attn.v_proj.weight",
    "o_proj": f"{_LAYER}.self_attn.o_proj.weight",
    "q_bias": f"{_LAYER}.self_attn.q_proj.bias",
    "k_bias": f"{_LAYER}.self_attn.k_proj.bias",
    "v_bias": f"{_LAYER}.self_attn.v_proj.bias",
    "o_bias": f"{_LAYER}.self_attn.o_proj.bias",
    "ffn_norm": f"{_LAYER}.post_attention_layernorm.weight",
}

# dtypes a tensor may have on disk: the compute dtypes, except for packed quantized data
COMPUTE_DTYPES = ("F32", "F16", "BF16")
PACKED_DTYPES = ("U8",)

# Roles the executor asks for; a family maps the ones it has to names on disk.
GLOBAL_ROLES = ("embed", "final_norm", "lm_head")
FINAL_NORM_BIAS_ROLES = ("final_norm_bias",)
LM_HEAD_BIAS_ROLES = ("lm_head_bias",)
ATTENTION_ROLES = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "ffn_norm")
MLA_ROLES = ("attn_norm", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj", "ffn_norm")
MLA_Q_ROLES = ("q_proj",)  # queries straight from the hidden state (q_lora_rank None)
MLA_Q_LORA_ROLES = ("q_a_proj", "q_a_norm", "q_b_proj")
SINK_ROLES = ("sinks",)
NORM_BIAS_ROLES = ("attn_norm_bias", "ffn_norm_bias")
ATTENTION_BIAS_ROLES = ("q_bias", "k_bias", "v_bias")
ATTENTION_OUT_BIAS_ROLES = ("o_bias",)
QK_NORM_ROLES = ("q_norm", "k_norm")
ROUTER_ROLES = ("router",)
ROUTER_BIAS_ROLES = ("router_bias",)
ROUTER_CORRECTION_BIAS_ROLES = ("router_correction_bias",)
EXPERT_ROLES = ("expert_gate", "expert_up", "expert_down")  # one tensor per expert
FUSED_EXPERT_ROLES = ("experts_gate_up", "experts_down")  # one tensor per layer, experts on dim 0
FUSED_EXPERT_BIAS_ROLES = ("experts_gate_up_bias", "experts_down_bias")
# the linear layers an FP8 checkpoint may store in float8 (not embeddings, norms, routers, lm head)
FP8_ROLES = frozenset(
    ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")
    + ("expert_gate", "expert_up", "expert_down", "shared_gate", "shared_up", "shared_down")
    + ("mlp_gate", "mlp_up", "mlp_down")
)
# the linear layers a GPTQ or compressed-tensors checkpoint may store packed (any linear module: which
# ones are is what the checkpoint holds, loaders/quant_formats.py); embeddings and norms never are
INT_QUANT_ROLES = FP8_ROLES | frozenset(("router", "shared_expert_gate", "lm_head"))
MXFP4_EXPERT_ROLES = ("experts_gate_up_blocks", "experts_gate_up_scales", "experts_down_blocks", "experts_down_scales")
SHARED_EXPERT_ROLES = ("shared_gate", "shared_up", "shared_down")
SHARED_EXPERT_GATE_ROLES = ("shared_expert_gate",)
DENSE_MLP_ROLES = ("mlp_gate", "mlp_up", "mlp_down")


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    tensor_names: dict[str, str]  # role -> name pattern
    tensor_shapes: dict[str, Shape]  # role -> shape in spec attribute names
    parse_config: Callable[[dict[str, Any], str], ModelSpec]
    fused_experts: bool = False  # experts stored as FUSED_EXPERT_ROLES rather than EXPERT_ROLES

    def tensor_name(self, role: str, layer: int | None = None, expert: int | None = None) -> str:
        return self.tensor_names[role].format(layer=layer, expert=expert)

    def tensor_shape(self, spec: ModelSpec, role: str) -> tuple[int, ...]:
        return tuple(dim if isinstance(dim, int) else getattr(spec, dim) for dim in self.tensor_shapes[role])

    @staticmethod
    def tensor_dtypes(spec: ModelSpec, role: str) -> tuple[str, ...]:
        """The safetensors dtypes a tensor of `role` may be stored in."""
        if role in MXFP4_EXPERT_ROLES:
            return PACKED_DTYPES
        if spec.quantization == "fp8" and role in FP8_ROLES:
            return COMPUTE_DTYPES + (FP8_DTYPE,)
        return COMPUTE_DTYPES

    def global_roles(self, spec: ModelSpec) -> tuple[str, ...]:
        roles = tuple(r for r in GLOBAL_ROLES if not (r == "lm_head" and spec.tie_word_embeddings))
        roles += FINAL_NORM_BIAS_ROLES if spec.norm_type == "layer" else ()
        # a tied head shares the embedding's weight, never a bias: the bias is its own tensor
        roles += LM_HEAD_BIAS_ROLES if spec.lm_head_bias else ()
        return roles

    def layer_roles(self, spec: ModelSpec, layer: int) -> tuple[str, ...]:
        """The per-layer (not per-expert) roles of decoder layer `layer` under this spec."""
        if spec.mla is None:
            roles = ATTENTION_ROLES
        else:
            roles = MLA_ROLES + (MLA_Q_ROLES if spec.mla.q_lora_rank is None else MLA_Q_LORA_ROLES)
        roles += SINK_ROLES if spec.attention_sinks else ()
        roles += NORM_BIAS_ROLES if spec.norm_type == "layer" else ()
        roles += ATTENTION_BIAS_ROLES if spec.attention_bias else ()
        roles += ATTENTION_OUT_BIAS_ROLES if spec.attention_out_bias else ()
        roles += QK_NORM_ROLES if spec.qk_norm else ()
        if layer in spec.moe_layers:
            roles += ROUTER_ROLES
            roles += ROUTER_BIAS_ROLES if spec.router_bias else ()
            roles += ROUTER_CORRECTION_BIAS_ROLES if spec.router_correction_bias else ()
            roles += SHARED_EXPERT_ROLES if spec.shared_expert_ffn else ()
            roles += SHARED_EXPERT_GATE_ROLES if spec.shared_expert_gated else ()
        else:
            roles += DENSE_MLP_ROLES
        return roles

    def expert_tensor_names(self, spec: ModelSpec, layer: int) -> dict[str, str]:
        """The routed experts' tensors of decoder layer `layer`: name on disk -> role."""
        if self.fused_experts:
            roles = MXFP4_EXPERT_ROLES if spec.quantization == "mxfp4" else FUSED_EXPERT_ROLES
            roles += FUSED_EXPERT_BIAS_ROLES if spec.expert_bias else ()
            return {self.tensor_name(role, layer): role for role in roles}
        return {
            self.tensor_name(role, layer, expert): role for expert in range(spec.num_experts) for role in EXPERT_ROLES
        }

    def expected_roles(self, spec: ModelSpec) -> dict[str, str]:
        """Every tensor name the model reads -> its role."""
        roles = {self.tensor_name(r): r for r in self.global_roles(spec)}
        for layer in range(spec.num_layers):
            roles.update({self.tensor_name(role, layer): role for role in self.layer_roles(spec, layer)})
        for layer in spec.moe_layers:
            roles.update(self.expert_tensor_names(spec, layer))
        return roles

    def expected_tensors(self, spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Every tensor name the model reads -> (the shape it must have on disk, its allowed dtypes).
        A GPTQ / compressed-tensors checkpoint may hold an INT_QUANT_ROLES weight packed instead
        (loaders/quant_formats.py says which tensors then, checked against this same shape)."""
        return {
            name: (self.tensor_shape(spec, role), self.tensor_dtypes(spec, role))
            for name, role in self.expected_roles(spec).items()
        }
