"""Tiny random checkpoints saved by transformers, the reference for conformance tests."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=101,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)
TINY_MIXTRAL = dict(COMMON, intermediate_size=96, num_local_experts=4)
# DeepSeek-V2/V3: layer 0 dense, 4 MoE layers of 8 experts, MLA with 4 heads (qk 16 + 8 rope, v 12)
TINY_DEEPSEEK = dict(
    COMMON,
    num_hidden_layers=5,
    num_key_value_heads=4,
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=8,
    first_k_dense_replace=1,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
)

# family -> (transformers config class, model class, tiny config); each has at least 4 MoE layers,
# so that a 30% expert budget still holds one layer's experts
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", TINY_MIXTRAL),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        # layer 0 dense (mlp_only_layers), a shared expert beside 6 routed ones, q/k/v biases
        dict(
            COMMON,
            num_hidden_layers=5,
            intermediate_size=80,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=56,
            num_experts=6,
            mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        # head_dim 24 != hidden / heads; per-head q/k norms; renormalised top-k; every 2nd layer MoE
        dict(
            COMMON,
            num_hidden_layers=8,
            head_dim=24,
            intermediate_size=80,
            moe_intermediate_size=48,
            num_experts=5,
            norm_topk_prob=True,
            decoder_sparse_step=2,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        # full-width q/k norms and a q/k/v clamp that binds with the test's weights
        dict(
            COMMON,
            num_hidden_layers=4,
            intermediate_size=48,
            num_experts=6,
            clip_qkv=3.0,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        # LayerNorm, biases on q/k/v/o and the lm head, a sliding window the 22-token prompt passes,
        # and a jitter eps large enough that sparsemixer's softmax often keeps more than the pick
        dict(
            COMMON,
            num_hidden_layers=4,
            intermediate_size=48,
            num_local_experts=6,
            attention_bias=True,
            lm_head_bias=True,
            sliding_window=16,
            router_jitter_noise=0.2,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        # MLA without a q bottleneck (V2-Lite), layer 0 dense, two shared experts, group-limited
        # routing that binds (3 experts from the better of 2 groups of 4), weights scaled
        dict(
            TINY_DEEPSEEK,
            n_shared_experts=2,
            q_lora_rank=None,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        # MLA with a q bottleneck, yarn rope with mscale_all_dim (scales the softmax too), sigmoid
        # routing with a correction bias over 4 groups of 2
        dict(
            TINY_DEEPSEEK,
            n_shared_experts=1,
            q_lora_rank=20,
            n_group=4,
            topk_group=2,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                mscale=1.0, mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0,
            ),
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        # fused experts with biases, clamped SwiGLU (a limit of 2 that binds with these weights), router
        # bias, sinks, sliding (8) and full layers alternating, yarn rope
        dict(
            COMMON,
            num_hidden_layers=4,
            head_dim=16,
            intermediate_size=48,
            num_local_experts=6,
            sliding_window=8,
            swiglu_limit=2.0,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=128,
                beta_fast=32.0, beta_slow=1.0, truncate=False,
            ),
        ),
    ),
}


def save_tiny(family: str, folder: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Builds a random model of `family`, saves it to `folder`, returns it in eval mode (float32)."""
    import transformers

    config_name, model_name, tiny = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**tiny, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # transformers initialises with std 0.02; larger weights make logits less flat, so that greedy
    # comparisons test real choices rather than near-ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif not torch.all(p == 1):  # biases; norms stay at one
                p.normal_(0.0, 0.1)
        # LayerNorm weights too, or a runtime that ignored them would pass; RMSNorm weights stay at
        # one so that the other families' checkpoints keep the weights their tests were tuned on
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def save_tiny_mixtral(folder: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    return save_tiny("mixtral", folder, seed, max_shard_size, **overrides)
