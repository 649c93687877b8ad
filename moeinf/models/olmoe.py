"""The OLMoE family (OlmoeForCausalLM): an RMSNorm over all of q and all of k (not per head), an
optional clamp of q, k and v, and no renormalisation of the top-k weights by default."""

from __future__ import annotations

from typing import Any

from moeinf.models.family import ROLE_SHAPES, Family
from moeinf.models.moe_config import INT_QUANTIZATIONS, read_moe_spec
from moeinf.models.qwen_moe import QWEN_TENSOR_NAMES
from moeinf.models.spec import ConfigReader, ModelSpec

# OLMoE stores its tensors under the same names as Qwen's MoE models; only its q/k norms differ
OLMOE_TENSOR_SHAPES = {**ROLE_SHAPES, "q_norm": ("q_dim",), "k_norm": ("kv_dim",)}


def parse_olmoe_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    read = ConfigReader(config, source)
    clip = config.get("clip_qkv")
    return read_moe_spec(
        config,
        source,
        architecture="OlmoeForCausalLM",
        family="olmoe",
        experts_keys=("num_experts",),
        expert_ffn_key="intermediate_size",
        renormalize_key="norm_topk_prob",
        renormalize_default=False,
        default_theta=10000.0,
        default_eps=1e-5,
        attention_bias=read.boolean("attention_bias", False),
        qk_norm="full",
        clip_qkv=None if clip is None else read.positive_float("clip_qkv"),
        router_weights_fp32=False,
        quantizations=INT_QUANTIZATIONS,
    )


OLMOE = Family(
    name="olmoe",
    architectures=("OlmoeForCausalLM",),
    tensor_names=QWEN_TENSOR_NAMES,
    tensor_shapes=OLMOE_TENSOR_SHAPES,
    parse_config=parse_olmoe_config,
)
