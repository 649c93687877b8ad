"""A random checkpoint of a supported family at a benchmark-sized shape, saved by transformers, so
the end-to-end and offload benchmarks can run families other than the default model:

    python -m bench.random_model --family deepseek_v2 --out /tmp/dsv2
    python -m bench.e2e --model /tmp/dsv2

The shape is the same for every family where the family allows (hidden 512, 6 layers, 8 heads,
16 experts of ffn 384, top-2, vocab 2048); family-specific sizes are listed in SHAPES. Weights are
transformers' own random initialisation (seeded), float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

COMMON = dict(
    vocab_size=2048,
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
)
# family -> (transformers config class, model class, config keywords beyond COMMON)
SHAPES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=384, num_local_experts=16)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(intermediate_size=1024, moe_intermediate_size=384, shared_expert_intermediate_size=768, num_experts=16),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=64, intermediate_size=1024, moe_intermediate_size=384, num_experts=16, norm_topk_prob=True),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=384, num_experts=16)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=384, num_local_experts=16)),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            intermediate_size=1024, moe_intermediate_size=384, n_routed_experts=16, n_shared_experts=2,
            first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=None, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=1024, moe_intermediate_size=384, n_routed_experts=16, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=192, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64, n_group=4, topk_group=2,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(num_key_value_heads=2, head_dim=64, intermediate_size=384, num_local_experts=16, sliding_window=128),
    ),
}  # fmt: skip


def save_random_model(family: str, out: Path, seed: int = 0) -> Path:
    import transformers

    config_name, model_name, extra = SHAPES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {save_random_model(args.family, args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
