"""The Qwen MoE families.

Qwen2-MoE (Qwen2MoeForCausalLM): q/k/v biases, a shared expert beside the routed ones whose
output is scaled by sigmoid(shared_expert_gate(x)), optional top-k renormalisation, and dense MLP
layers wherever decoder_sparse_step / mlp_only_layers say so.
Qwen3-MoE (Qwen3MoeForCausalLM): no biases and no shared expert, but an RMSNorm over each head of
q and k before RoPE.
"""

from __future__ import annotations

from typing import Any

from moeinf.errors import ConfigError
from moeinf.models.family import DECODER_TENSOR_NAMES, ROLE_SHAPES, Family
from moeinf.models.moe_config import INT_QUANTIZATIONS, read_moe_spec
from moeinf.models.spec import ConfigReader, ModelSpec

_LAYER = "model.layers.{layer}"
QWEN_TENSOR_NAMES = {
    **DECODER_TENSOR_NAMES,
    "q_norm": f"{_LAYER}.self_attn.q_norm.weight",
    "k_norm": f"{_LAYER}.self_attn.k_norm.weight",
    "router": f"{_LAYER}.mlp.gate.weight",
    "expert_gate": f"{_LAYER}.mlp.experts.{{expert}}.gate_proj.weight",
    "expert_up": f"{_LAYER}.mlp.experts.{{expert}}.up_proj.weight",
    "expert_down": f"{_LAYER}.mlp.experts.{{expert}}.down_proj.weight",
    "shared_gate": f"{_LAYER}.mlp.shared_expert.gate_proj.weight",
    "shared_up": f"{_LAYER}.mlp.shared_expert.up_proj.weight",
    "shared_down": f"{_LAYER}.mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": f"{_LAYER}.mlp.shared_expert_gate.weight",
    "mlp_gate": f"{_LAYER}.mlp.gate_proj.weight",
    "mlp_up": f"{_LAYER}.mlp.up_proj.weight",
    "mlp_down": f"{_LAYER}.mlp.down_proj.weight",
}

def layer_windows(read: ConfigReader, num_layers: int) -> tuple[int | None, ...]:
    """Qwen applies its sliding window only with use_sliding_window, and then only to the layers
    `layer_types` marks "sliding_attention" (or, in older configs, layers >= max_window_layers)."""
    if not read.boolean("use_sliding_window", False):
        return (None,) * num_layers
    window = read.positive_int("sliding_window")
    types = read.config.get("layer_types")
    if types is None:
        first = read.positive_int("max_window_layers", num_layers)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConfigError(f"{read.source}: expected 'layer_types' to list {num_layers} layer types, found {types!r}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _qwen_spec(config: dict[str, Any], source: str, architecture: str, family: str, **features: Any) -> ModelSpec:
    read = ConfigReader(config, source)
    num_layers = read.positive_int("num_hidden_layers")
    return read_moe_spec(
        config,
        source,
        architecture=architecture,
        family=family,
        experts_keys=("num_experts", "num_local_experts"),
        expert_ffn_key="moe_intermediate_size",
        renormalize_key="norm_topk_prob",
        renormalize_default=False,
        default_theta=10000.0,
        default_max_position=32768,
        moe_layers="sparse_step",
        dense_ffn=read.optional_positive_int("intermediate_size"),
        router_weights_fp32=False,
        layer_windows=layer_windows(read, num_layers),
        sliding_window=None,  # Qwen writes 0 when unused; layer_windows says where a window applies
        **features,
    )


def parse_qwen2_moe_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    read = ConfigReader(config, source)
    shared = config.get("shared_expert_intermediate_size")
    shared_ffn = read.positive_int("shared_expert_intermediate_size") if shared else None
    return _qwen_spec(
        config,
        source,
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        attention_bias=read.boolean("qkv_bias", True),
        shared_expert_ffn=shared_ffn,
        shared_expert_gated=shared_ffn is not None,
        quantizations=INT_QUANTIZATIONS,
    )


def parse_qwen3_moe_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    read = ConfigReader(config, source)
    return _qwen_spec(
        config,
        source,
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        attention_bias=read.boolean("attention_bias", False),
        qk_norm="head",
        quantizations=("fp8", *INT_QUANTIZATIONS),  # the Qwen3-*-FP8 releases; GPTQ / llm-compressor ones
    )


QWEN2_MOE = Family(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    tensor_names=QWEN_TENSOR_NAMES,
    tensor_shapes=ROLE_SHAPES,
    parse_config=parse_qwen2_moe_config,
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    tensor_names=QWEN_TENSOR_NAMES,
    tensor_shapes=ROLE_SHAPES,
    parse_config=parse_qwen3_moe_config,
)
