"""Routing rules against transformers' own functions, and the configs they refuse."""

import pytest
import torch

from moeinf.errors import ConfigError
from moeinf.models.phimoe import parse_phimoe_config
from moeinf.models.routing import sparsemixer

PHIMOE = {
    "architectures": ["PhimoeForCausalLM"],
    "vocab_size": 101,
    "hidden_size": 64,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 6,
    "num_experts_per_tok": 2,
}


@pytest.mark.parametrize("jitter", [0.0, 0.01, 0.2, 1.0])
@pytest.mark.parametrize("shift", [-3.0, 0.0, 3.0])  # the masking rule divides by |logits|: test both signs
def test_sparsemixer_matches_transformers(jitter, shift):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as reference

    logits = torch.randn(64, 6, generator=torch.Generator().manual_seed(int(jitter * 100) + int(shift))) + shift
    ids, weights = sparsemixer(logits, jitter)
    expected_weights, expected_ids = reference(logits, jitter_eps=jitter, training=False, top_k=2)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights.to(expected_weights.dtype), expected_weights, rtol=0, atol=0)


def test_phimoe_refuses_other_than_two_experts_per_token():
    with pytest.raises(ConfigError, match="expected num_experts_per_tok 2, found 3"):
        parse_phimoe_config({**PHIMOE, "num_experts_per_tok": 3})


def test_phimoe_refuses_longrope_until_it_is_supported():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported; supported: default"):
        parse_phimoe_config({**PHIMOE, "rope_parameters": rope})
