"""The DeepSeek-V2 and DeepSeek-V3 families (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM).

Both: multi-head latent attention (models/mla.py) with interleaved rotary pairs, yarn rope whose
mscale_all_dim also rescales the softmax, dense SwiGLU layers before first_k_dense_replace and MoE
layers after it, each with n_shared_experts always-on experts (one SwiGLU n_shared times as wide),
and a router kept and computed in float32 whose weights are times routed_scaling_factor.
Routing: V2 softmax top-k, optionally limited to the topk_group best groups of experts
(topk_method "group_limited_greedy"); V3 sigmoid scores plus e_score_correction_bias to choose,
groups scored by their two best, weights renormalised (norm_topk_prob).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from moeinf.errors import ConfigError
from moeinf.models.family import DECODER_TENSOR_NAMES, ROLE_SHAPES, Family
from moeinf.models.moe_config import INT_QUANTIZATIONS, read_moe_spec
from moeinf.models.spec import ConfigReader, MLASpec, ModelSpec

_LAYER = "model.layers.{layer}"
DEEPSEEK_TENSOR_NAMES = {
    **DECODER_TENSOR_NAMES,
    "q_a_proj": f"{_LAYER}.self_attn.q_a_proj.weight",
    "q_a_norm": f"{_LAYER}.self_attn.q_a_layernorm.weight",
    "q_b_proj": f"{_LAYER}.self_attn.q_b_proj.weight",
    "kv_a_proj": f"{_LAYER}.self_attn.kv_a_proj_with_mqa.weight",
    "kv_a_norm": f"{_LAYER}.self_attn.kv_a_layernorm.weight",
    "kv_b_proj": f"{_LAYER}.self_attn.kv_b_proj.weight",
    "router": f"{_LAYER}.mlp.gate.weight",
    "router_correction_bias": f"{_LAYER}.mlp.gate.e_score_correction_bias",
    "expert_gate": f"{_LAYER}.mlp.experts.{{expert}}.gate_proj.weight",
    "expert_up": f"{_LAYER}.mlp.experts.{{expert}}.up_proj.weight",
    "expert_down": f"{_LAYER}.mlp.experts.{{expert}}.down_proj.weight",
    "shared_gate": f"{_LAYER}.mlp.shared_experts.gate_proj.weight",
    "shared_up": f"{_LAYER}.mlp.shared_experts.up_proj.weight",
    "shared_down": f"{_LAYER}.mlp.shared_experts.down_proj.weight",
    "mlp_gate": f"{_LAYER}.mlp.gate_proj.weight",
    "mlp_up": f"{_LAYER}.mlp.up_proj.weight",
    "mlp_down": f"{_LAYER}.mlp.down_proj.weight",
}


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _attention_scale(spec: ModelSpec, qk_head_dim: int) -> float:
    """qk_head_dim ** -0.5, times mscale ** 2 under a scaled rope with mscale_all_dim (DeepSeek's
    yarn: the longer context sharpens the softmax)."""
    scale = qk_head_dim**-0.5
    mscale_all_dim = spec.rope.get("mscale_all_dim", 0)
    if spec.rope.rope_type != "default" and mscale_all_dim:
        scale *= _yarn_mscale(spec.rope.factor, mscale_all_dim) ** 2
    return scale


def _groups(read: ConfigReader, experts: int, top_k: int, group_size_min: int) -> tuple[int, int]:
    n_group, topk_group = read.positive_int("n_group"), read.positive_int("topk_group")
    if experts % n_group or experts // n_group < group_size_min:
        raise ConfigError(
            f"{read.source}: expected n_group ({n_group}) to split the {experts} experts into equal groups of at "
            f"least {group_size_min}"
        )
    if topk_group > n_group or top_k > topk_group * (experts // n_group):
        raise ConfigError(
            f"{read.source}: expected topk_group <= n_group and num_experts_per_tok <= topk_group * group size, "
            f"found topk_group {topk_group}, n_group {n_group}, num_experts_per_tok {top_k}"
        )
    return n_group, topk_group


# transformers' config defaults where they differ from read_moe_spec's own, used for absent keys
V2_DEFAULTS = {
    "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
    "moe_intermediate_size": 1407, "intermediate_size": 11008, "routed_scaling_factor": 1.0,
    "max_position_embeddings": 2048,
}  # fmt: skip
V3_DEFAULTS = {
    **V2_DEFAULTS, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "moe_intermediate_size": 2048, "intermediate_size": 18432,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "max_position_embeddings": 4096,
}  # fmt: skip


def _deepseek_spec(config: dict[str, Any], source: str, architecture: str, family: str, v3: bool) -> ModelSpec:
    if isinstance(config, dict):
        config = {**(V3_DEFAULTS if v3 else V2_DEFAULTS), **config}
    read = ConfigReader(config, source)
    if read.boolean("attention_bias", False):
        raise ConfigError(
            f"{source}: expected attention_bias false (no DeepSeek checkpoint has MLA biases), found true"
        )
    q_lora = read.optional_positive_int("q_lora_rank")
    mla = MLASpec(
        q_lora_rank=q_lora,
        kv_lora_rank=read.positive_int("kv_lora_rank"),
        qk_nope_head_dim=read.positive_int("qk_nope_head_dim"),
        qk_rope_head_dim=read.positive_int("qk_rope_head_dim"),
        v_head_dim=read.positive_int("v_head_dim"),
    )
    heads = read.positive_int("num_attention_heads")
    experts = read.positive_int("n_routed_experts")
    top_k = read.positive_int("num_experts_per_tok")
    n_shared = read.non_negative_int("n_shared_experts")
    features: dict[str, Any] = {}
    if v3:
        n_group, topk_group = _groups(read, experts, top_k, group_size_min=2)  # groups score by their best two
        routing, renormalize = "sigmoid_grouped", read.boolean("norm_topk_prob", False)
        features["router_correction_bias"] = True
    else:
        method = read.string("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"{source}: expected topk_method 'greedy' or 'group_limited_greedy', found {method!r}")
        n_group, topk_group = _groups(read, experts, top_k, 1) if method == "group_limited_greedy" else (1, 1)
        # transformers' DeepSeek-V2 never renormalises, whatever norm_topk_prob says
        routing, renormalize = ("softmax_grouped" if method == "group_limited_greedy" else "softmax_topk"), False
    spec = read_moe_spec(
        {**config, "num_key_value_heads": heads},  # every head has its own keys, expanded from the latent
        source,
        architecture=architecture,
        family=family,
        experts_keys=("n_routed_experts",),
        expert_ffn_key="moe_intermediate_size",
        renormalize_key=None,
        renormalize_default=renormalize,
        default_theta=10000.0,
        moe_layers="first_k_dense",
        head_dim=mla.qk_head_dim,
        rotary_dim=mla.qk_rope_head_dim,
        dense_ffn=read.optional_positive_int("intermediate_size"),
        shared_expert_ffn=read.positive_int("moe_intermediate_size") * n_shared if n_shared else None,
        sliding_window=None,
        mla=mla,
        rope_interleaved=read.boolean("rope_interleave", True) if v3 else True,
        rope_fp32=not v3,  # V2 rotates with complex float32 arithmetic (apply_rotary_emb)
        routing=routing,
        routed_scaling_factor=read.positive_float("routed_scaling_factor"),
        n_group=n_group,
        topk_group=topk_group,
        router_fp32=True,
        quantizations=("fp8", *INT_QUANTIZATIONS),  # DeepSeek-V3 ships fine-grained FP8
        **features,
    )
    if spec.num_moe_layers < spec.num_layers and spec.dense_ffn is None:
        raise ConfigError(f"{source}: layers before first_k_dense_replace are dense; expected 'intermediate_size'")
    return replace(spec, attention_scale=_attention_scale(spec, mla.qk_head_dim))


def parse_deepseek_v2_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    return _deepseek_spec(config, source, "DeepseekV2ForCausalLM", "deepseek_v2", v3=False)


def parse_deepseek_v3_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    return _deepseek_spec(config, source, "DeepseekV3ForCausalLM", "deepseek_v3", v3=True)


DEEPSEEK_V2 = Family(
    name="deepseek_v2",
    architectures=("DeepseekV2ForCausalLM",),
    tensor_names=DEEPSEEK_TENSOR_NAMES,
    tensor_shapes=ROLE_SHAPES,
    parse_config=parse_deepseek_v2_config,
)

DEEPSEEK_V3 = Family(
    name="deepseek_v3",
    architectures=("DeepseekV3ForCausalLM",),
    tensor_names=DEEPSEEK_TENSOR_NAMES,
    tensor_shapes=ROLE_SHAPES,
    parse_config=parse_deepseek_v3_config,
)
