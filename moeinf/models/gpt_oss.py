"""The GPT-OSS family (GptOssForCausalLM).

Attention: q/k/v/o with biases, a learnt sink logit per head that joins every softmax, sliding-window
and full layers alternating as layer_types says, yarn rope. Every layer is MoE: a router with a bias
whose top-k logits are softmaxed among themselves, and experts with biases and a clamped SwiGLU
(kernels/expert_activation.py). The experts are stored fused, one tensor per layer for all experts,
x @ W layout, gate and up interleaved on the last dim; the loader reads one expert's row of each and
lays it out like every other family's (Checkpoint.expert_weights). OpenAI's checkpoints hold the
expert weights in MXFP4 (quantization_config quant_method "mxfp4"): packed blocks and scales,
dequantized to the compute dtype when the expert store is built (kernels/mxfp4.py).
"""

from __future__ import annotations

from typing import Any

from moeinf.errors import ConfigError
from moeinf.kernels.expert_activation import ExpertActivation
from moeinf.kernels.mxfp4 import BLOCK
from moeinf.models.family import DECODER_TENSOR_NAMES, ROLE_SHAPES, Family
from moeinf.models.moe_config import read_moe_spec
from moeinf.models.spec import ConfigReader, ModelSpec

_LAYER = "model.layers.{layer}"
GPT_OSS_TENSOR_NAMES = {
    **DECODER_TENSOR_NAMES,
    "sinks": f"{_LAYER}.self_attn.sinks",
    "router": f"{_LAYER}.mlp.router.weight",
    "router_bias": f"{_LAYER}.mlp.router.bias",
    "experts_gate_up": f"{_LAYER}.mlp.experts.gate_up_proj",
    "experts_gate_up_bias": f"{_LAYER}.mlp.experts.gate_up_proj_bias",
    "experts_down": f"{_LAYER}.mlp.experts.down_proj",
    "experts_down_bias": f"{_LAYER}.mlp.experts.down_proj_bias",
    "experts_gate_up_blocks": f"{_LAYER}.mlp.experts.gate_up_proj_blocks",
    "experts_gate_up_scales": f"{_LAYER}.mlp.experts.gate_up_proj_scales",
    "experts_down_blocks": f"{_LAYER}.mlp.experts.down_proj_blocks",
    "experts_down_scales": f"{_LAYER}.mlp.experts.down_proj_scales",
}


def alternating_windows(read: ConfigReader, num_layers: int) -> tuple[int | None, ...]:
    """The window of each layer: sliding_window where layer_types says "sliding_attention", none on
    "full_attention" layers; without layer_types, even layers slide (transformers' default)."""
    types = read.config.get("layer_types")
    if types is None:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    known = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != num_layers or not all(t in known for t in types):
        raise ConfigError(
            f"{read.source}: expected 'layer_types' to list {num_layers} of {', '.join(known)}, found {types!r}"
        )
    # 128 where the config leaves it out: transformers' default
    window = read.positive_int("sliding_window", 128) if "sliding_attention" in types else None
    return tuple(window if t == "sliding_attention" else None for t in types)


def parse_gpt_oss_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    read = ConfigReader(config, source)
    attention_bias = read.boolean("attention_bias", True)
    spec = read_moe_spec(
        config,
        source,
        architecture="GptOssForCausalLM",
        family="gpt_oss",
        experts_keys=("num_local_experts",),
        expert_ffn_key="intermediate_size",
        renormalize_key=None,
        renormalize_default=False,  # the softmax over the top k already sums to one
        default_theta=150000.0,
        default_eps=1e-5,
        default_max_position=131072,
        sliding_window=None,  # layer_windows says which layers slide
        layer_windows=alternating_windows(read, read.positive_int("num_hidden_layers")),
        attention_bias=attention_bias,
        attention_out_bias=attention_bias,
        attention_sinks=True,
        routing="topk_softmax",
        router_bias=True,
        router_weights_fp32=False,  # transformers weighs expert outputs in the model dtype
        norm_scale_fp32=True,  # GptOssRMSNorm: (weight * normed float32 rows).to(dtype)
        expert_bias=True,
        expert_activation=ExpertActivation(
            "clamped_swiglu",
            alpha=read.positive_float("swiglu_alpha", 1.702),
            limit=read.positive_float("swiglu_limit", 7.0),
        ),
        quantizations=("mxfp4",),  # how OpenAI ships the experts
    )
    if spec.quantization == "mxfp4" and (spec.hidden_size % BLOCK or spec.expert_ffn % BLOCK):
        raise ConfigError(
            f"{source}: MXFP4 experts pack rows in blocks of {BLOCK}; expected hidden_size and intermediate_size "
            f"to be multiples of {BLOCK}, found {spec.hidden_size} and {spec.expert_ffn}"
        )
    return spec


GPT_OSS = Family(
    name="gpt_oss",
    architectures=("GptOssForCausalLM",),
    tensor_names=GPT_OSS_TENSOR_NAMES,
    tensor_shapes=ROLE_SHAPES,
    parse_config=parse_gpt_oss_config,
    fused_experts=True,
)
