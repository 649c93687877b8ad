"""The Mixtral family (MixtralForCausalLM): GQA attention with RoPE, softmax top-k routing with
renormalisation, SwiGLU experts stored one tensor per projection per expert."""

from __future__ import annotations

from typing import Any

from moeinf.models.family import DECODER_TENSOR_NAMES, ROLE_SHAPES, Family
from moeinf.models.moe_config import INT_QUANTIZATIONS, read_moe_spec
from moeinf.models.spec import ModelSpec

MIXTRAL_TENSOR_NAMES = {
    **DECODER_TENSOR_NAMES,
    "router": "model.layers.{layer}.block_sparse_moe.gate.weight",
    "expert_gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    "expert_up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    "expert_down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
}

def parse_mixtral_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    return read_moe_spec(
        config,
        source,
        architecture="MixtralForCausalLM",
        family="mixtral",
        experts_keys=("num_local_experts",),
        expert_ffn_key="intermediate_size",
        renormalize_key=None,
        renormalize_default=True,
        default_theta=1e6,
        default_eps=1e-5,
        default_max_position=4096 * 32,
        quantizations=INT_QUANTIZATIONS,
    )


MIXTRAL = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    tensor_names=MIXTRAL_TENSOR_NAMES,
    tensor_shapes=ROLE_SHAPES,
    parse_config=parse_mixtral_config,
)
