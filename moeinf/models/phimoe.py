"""The PhiMoE family (PhimoeForCausalLM, Phi-3.5-MoE): Mixtral's layout with LayerNorm (weight and
bias) in place of RMSNorm, biases on q, k, v and o and on the lm head, and sparsemixer routing.

transformers 5 holds the experts fused in memory (gate_up_proj [E, 2F, D]) but saves and loads them
one tensor per projection per expert, under Mixtral's names (w1 gate, w3 up, w2 down).
"""

from __future__ import annotations

from typing import Any

from moeinf.errors import ConfigError
from moeinf.models.family import ROLE_SHAPES, Family
from moeinf.models.mixtral import MIXTRAL_TENSOR_NAMES
from moeinf.models.moe_config import INT_QUANTIZATIONS, read_moe_spec
from moeinf.models.spec import ConfigReader, ModelSpec

_LAYER = "model.layers.{layer}"
PHIMOE_TENSOR_NAMES = {
    **MIXTRAL_TENSOR_NAMES,
    "final_norm_bias": "model.norm.bias",
    "lm_head_bias": "lm_head.bias",
    "attn_norm_bias": f"{_LAYER}.input_layernorm.bias",
    "ffn_norm_bias": f"{_LAYER}.post_attention_layernorm.bias",
}

# Under any other rope type transformers' PhiMoE replaces the rope's attention scaling by
# short_mscale or long_mscale, chosen by the longest position in the batch; moeinf has no such rule
# yet, so only unscaled RoPE is computed exactly (Phi-3.5-MoE itself ships "longrope").
PHIMOE_ROPE_TYPES = ("default",)


def parse_phimoe_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    read = ConfigReader(config, source)
    top_k = read.positive_int("num_experts_per_tok", 2)
    if top_k != 2:
        raise ConfigError(
            f"{source}: PhiMoE's sparsemixer routing always picks 2 experts; expected num_experts_per_tok 2, "
            f"found {top_k}"
        )
    attention_bias = read.boolean("attention_bias", False)
    return read_moe_spec(
        config,
        source,
        architecture="PhimoeForCausalLM",
        family="phimoe",
        experts_keys=("num_local_experts",),
        expert_ffn_key="intermediate_size",
        renormalize_key=None,
        renormalize_default=False,  # sparsemixer's two weights do not sum to one, and stay so
        default_theta=1e6,
        default_eps=1e-5,
        default_max_position=4096 * 32,
        rope_types=PHIMOE_ROPE_TYPES,
        attention_bias=attention_bias,
        attention_out_bias=attention_bias,
        lm_head_bias=read.boolean("lm_head_bias", False),
        norm_type="layer",
        routing="sparsemixer",
        # in eval mode the jitter noise is no noise: it only sets how close to the best logit an
        # expert must be to share the softmax that weights the pick
        router_jitter_eps=read.non_negative_float("router_jitter_noise", 0.01),
        # transformers multiplies expert outputs by weights in the model dtype
        router_weights_fp32=False,
        quantizations=INT_QUANTIZATIONS,
    )


PHIMOE = Family(
    name="phimoe",
    architectures=("PhimoeForCausalLM",),
    tensor_names=PHIMOE_TENSOR_NAMES,
    tensor_shapes=ROLE_SHAPES,
    parse_config=parse_phimoe_config,
)
