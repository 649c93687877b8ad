"""The Mixtral family (MixtralForCausalLM): GQA attention with RoPE, softmax top-k routing with
renormalisation, SwiGLU experts stored one tensor per projection per expert."""

from __future__ import annotations

from typing import Any

from moeinf.errors import ConfigError
from moeinf.models.family import Family
from moeinf.models.spec import ConfigReader, ModelSpec, read_rope

MIXTRAL_TENSOR_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{layer}.input_layernorm.weight",
    "q_proj": "model.layers.{layer}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{layer}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{layer}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{layer}.self_attn.o_proj.weight",
    "moe_norm": "model.layers.{layer}.post_attention_layernorm.weight",
    "router": "model.layers.{layer}.block_sparse_moe.gate.weight",
    "expert_gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    "expert_up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    "expert_down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
}

MIXTRAL_TENSOR_SHAPES = {
    "embed": ("vocab_size", "hidden_size"),
    "final_norm": ("hidden_size",),
    "lm_head": ("vocab_size", "hidden_size"),
    "attn_norm": ("hidden_size",),
    "q_proj": ("q_dim", "hidden_size"),
    "k_proj": ("kv_dim", "hidden_size"),
    "v_proj": ("kv_dim", "hidden_size"),
    "o_proj": ("hidden_size", "q_dim"),
    "moe_norm": ("hidden_size",),
    "router": ("num_experts", "hidden_size"),
    "expert_gate": ("expert_ffn", "hidden_size"),
    "expert_up": ("expert_ffn", "hidden_size"),
    "expert_down": ("hidden_size", "expert_ffn"),
}


def parse_mixtral_config(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    read = ConfigReader(config, source)
    hidden = read.positive_int("hidden_size")
    heads = read.positive_int("num_attention_heads")
    kv_heads = read.positive_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = read.optional_positive_int("head_dim") or hidden // heads
    experts = read.positive_int("num_local_experts")
    top_k = read.positive_int("num_experts_per_tok")
    if top_k > experts:
        raise ConfigError(f"{source}: num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})")
    act = read.string("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: expected hidden_act 'silu' for Mixtral experts, found {act!r}")
    return ModelSpec(
        architecture="MixtralForCausalLM",
        family="mixtral",
        num_layers=read.positive_int("num_hidden_layers"),
        hidden_size=hidden,
        vocab_size=read.positive_int("vocab_size"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_experts=experts,
        top_k=top_k,
        expert_ffn=read.positive_int("intermediate_size"),
        norm_eps=read.positive_float("rms_norm_eps", 1e-5),
        rope=read_rope(read, head_dim, default_theta=1e6),
        max_position=read.positive_int("max_position_embeddings", 4096 * 32),
        sliding_window=read.optional_positive_int("sliding_window"),
        tie_word_embeddings=read.boolean("tie_word_embeddings", False),
        renormalize_topk=True,
        torch_dtype=read.string("dtype", read.string("torch_dtype", "float32")),
        bos_token_id=(read.token_ids("bos_token_id") or (None,))[0],
        eos_token_ids=read.token_ids("eos_token_id"),
    )


MIXTRAL = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    tensor_names=MIXTRAL_TENSOR_NAMES,
    tensor_shapes=MIXTRAL_TENSOR_SHAPES,
    parse_config=parse_mixtral_config,
)
