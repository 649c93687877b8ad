"""Tiny random checkpoints saved by transformers, the reference for conformance tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_MIXTRAL = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)


def save_tiny_mixtral(folder: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Builds a random MixtralForCausalLM, saves it to `folder`, returns it in eval mode (float32)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{**TINY_MIXTRAL, **overrides})
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    # transformers initialises with std 0.02; larger weights make logits less flat, so that greedy
    # comparisons test real choices rather than near-ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model
