"""ModelSpec and RoPE: config.json (both transformers layouts) -> spec, spec -> inverse frequencies,
checked against transformers' own rope initialisation and, end to end, against its logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeinf import LLM
from moeinf.errors import ConfigError
from moeinf.models.registry import spec_from_config
from moeinf.models.rope import inverse_frequencies
from moeinf.models.spec import ROPE_TYPES, ConfigReader, RopeSpec, read_rope
from tests.checkpoints import TINY_MIXTRAL, save_tiny_mixtral

THETA = 10000.0
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
YARN = dict(factor=4.0, original_max_position_embeddings=128)
YARN_MSCALE = dict(factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=0.5)


def mixtral_config(**extra) -> dict:
    """A config.json dict in the transformers 5.x layout, without rope settings."""
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **TINY_MIXTRAL, **extra}


def rope_of(config: dict) -> RopeSpec:
    return spec_from_config(config)[1].rope


# ---------------------------------------------------------------------------------------- ModelSpec


def test_spec_matches_transformers_config(tiny_mixtral):
    folder, model = tiny_mixtral
    hf = model.config
    family, spec = spec_from_config(json.loads((folder / "config.json").read_text()))
    assert family.name == "mixtral" and spec.architecture == "MixtralForCausalLM"
    assert spec.num_layers == hf.num_hidden_layers == 2
    assert spec.hidden_size == hf.hidden_size
    assert spec.num_heads == hf.num_attention_heads
    assert spec.num_kv_heads == hf.num_key_value_heads
    assert spec.head_dim == (hf.head_dim or hf.hidden_size // hf.num_attention_heads) == 16
    assert spec.num_experts == hf.num_local_experts
    assert spec.top_k == hf.num_experts_per_tok
    assert spec.expert_ffn == hf.intermediate_size
    assert spec.vocab_size == hf.vocab_size
    assert spec.norm_eps == hf.rms_norm_eps
    assert spec.max_position == hf.max_position_embeddings
    assert spec.sliding_window == hf.sliding_window
    assert spec.tie_word_embeddings == hf.tie_word_embeddings
    assert spec.rope.rope_type == "default"
    assert spec.rope.theta == hf.rope_parameters["rope_theta"]
    assert spec.rope.rotary_dim == spec.head_dim
    assert spec.bos_token_id == hf.bos_token_id
    assert spec.eos_token_ids == (hf.eos_token_id,)
    assert spec.torch_dtype == "float32"
    assert (spec.q_dim, spec.kv_dim) == (64, 32)


# ------------------------------------------------------------------------------------- rope layouts


@pytest.mark.parametrize(
    "legacy_type_key, rope_type, params",
    [
        ("type", "linear", dict(factor=2.0)),
        ("rope_type", "linear", dict(factor=2.0)),
        ("rope_type", "llama3", LLAMA3),
        ("type", "yarn", YARN_MSCALE),
    ],
)
def test_legacy_layout_parses_like_v5_layout(legacy_type_key, rope_type, params):
    legacy = mixtral_config(rope_theta=THETA, rope_scaling={legacy_type_key: rope_type, **params})
    v5 = mixtral_config(rope_parameters={"rope_type": rope_type, "rope_theta": THETA, **params})
    got = rope_of(legacy)
    assert got == rope_of(v5)
    assert (got.rope_type, got.theta, got.factor, got.rotary_dim) == (rope_type, THETA, params["factor"], 16)


def test_legacy_layout_linear_exact():
    got = rope_of(mixtral_config(rope_theta=THETA, rope_scaling={"type": "linear", "factor": 2.0}))
    assert got == RopeSpec(rope_type="linear", theta=THETA, rotary_dim=16, factor=2.0)


def test_legacy_layout_without_scaling_is_default_rope():
    assert rope_of(mixtral_config(rope_theta=THETA)) == RopeSpec("default", THETA, 16)
    assert rope_of(mixtral_config(rope_theta=THETA, rope_scaling=None)) == RopeSpec("default", THETA, 16)
    assert rope_of(mixtral_config()).theta == 1e6  # Mixtral's default theta


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic"])
@pytest.mark.parametrize("layout", ["v5", "legacy"])
def test_unsupported_rope_type(rope_type, layout):
    if layout == "v5":
        config = mixtral_config(rope_parameters={"rope_type": rope_type, "rope_theta": THETA, "factor": 2.0})
    else:
        config = mixtral_config(rope_theta=THETA, rope_scaling={"type": rope_type, "factor": 2.0})
    pattern = rf"rope type '{rope_type}' is not supported; supported: {', '.join(ROPE_TYPES)}"
    with pytest.raises(ConfigError, match=pattern):
        spec_from_config(config)


def test_llama3_missing_knob_names_it():
    params = {"rope_type": "llama3", "rope_theta": THETA, **LLAMA3}
    del params["high_freq_factor"]
    with pytest.raises(ConfigError, match=r"missing required key 'high_freq_factor'"):
        read_rope(ConfigReader(mixtral_config(rope_parameters=params)), 16, 1e6)


# -------------------------------------------------------------------------- inverse frequencies vs HF

ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", **LLAMA3},
    "yarn": {"rope_type": "yarn", **YARN},
    "yarn-mscale": {"rope_type": "yarn", **YARN_MSCALE},
    "yarn-untruncated-betas": {"rope_type": "yarn", **YARN, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inverse_frequencies_match_transformers(case):
    from transformers import MixtralConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_parameters = {"rope_theta": THETA, **ROPE_CASES[case]}
    # head_dim explicit: transformers' yarn reads config.head_dim without the hidden // heads fallback
    hf = MixtralConfig(**{**TINY_MIXTRAL, "head_dim": 16}, rope_parameters=dict(rope_parameters))
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf, device="cpu")

    config = mixtral_config(head_dim=16, rope_parameters=dict(rope_parameters))
    inv_freq, factor = inverse_frequencies(rope_of(config))
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (8,)
    torch.testing.assert_close(inv_freq, expected_inv_freq.to(torch.float32), rtol=1e-6, atol=0)
    assert math.isclose(factor, expected_factor, rel_tol=1e-9)
    if case.startswith("yarn"):
        assert factor > 1.0  # the attention factor is really exercised


# --------------------------------------------------------------------------------------- end to end

E2E_ROPE = {
    "llama3": {"rope_type": "llama3", "rope_theta": THETA, **LLAMA3},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": THETA, **YARN_MSCALE},
}
IDS = [(17 * i + 5) % TINY_MIXTRAL["vocab_size"] for i in range(40)]


@pytest.mark.parametrize("case", list(E2E_ROPE))
def test_rope_scaled_logits_match_transformers(case, tmp_path):
    model = save_tiny_mixtral(tmp_path, seed=3, head_dim=16, rope_parameters=dict(E2E_ROPE[case]))
    llm = LLM(tmp_path, progress=False)
    assert llm.spec.rope.rope_type == E2E_ROPE[case]["rope_type"]
    with torch.no_grad():
        expected = model(torch.tensor([IDS])).logits[0]
    got = llm.logits(IDS)
    assert got.shape == expected.shape == (len(IDS), TINY_MIXTRAL["vocab_size"])
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4

    # not vacuous: the same weights under plain rope give clearly different logits at these positions
    from transformers import MixtralForCausalLM

    plain_config = type(model.config)(
        **{**TINY_MIXTRAL, "head_dim": 16}, rope_parameters={"rope_type": "default", "rope_theta": THETA}
    )
    plain = MixtralForCausalLM(plain_config).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        unscaled = plain(torch.tensor([IDS])).logits[0]
    assert ((got - unscaled).norm() / unscaled.norm()).item() > 1e-2


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(rope_scaling=[1]), "expected 'rope_scaling' to be an object"),
        (dict(rope_scaling="linear"), "expected 'rope_scaling' to be an object"),
        (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 1.5}), "partial_rotary_factor <= 1"),
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}),
            "original_max_position_embeddings",
        ),
    ],
)
def test_malformed_rope_settings_are_config_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        rope_of(mixtral_config(**extra))


# ----------------------------------------------------------------------------- quantization_config

GPTQ = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "quant_method": "gptq"}
PACK_QUANTIZED = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}


@pytest.mark.parametrize("quantization", [GPTQ, {**GPTQ, "quant_method": "GPTQ"}, PACK_QUANTIZED])
@pytest.mark.parametrize(
    "architecture",
    ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "PhimoeForCausalLM"],
)
def test_families_with_per_expert_linears_accept_integer_checkpoints(architecture, quantization):
    # the spec names the method; loaders/quant_formats.py reads the rest of the config
    config = mixtral_config(architectures=[architecture], num_experts=4, moe_intermediate_size=96)
    config["quantization_config"] = quantization
    spec = spec_from_config(config)[1]
    assert spec.quantization == quantization["quant_method"].lower() and spec.quant_block is None


def test_fused_experts_refuse_integer_checkpoints():
    config = mixtral_config(architectures=["GptOssForCausalLM"], num_local_experts=4, quantization_config=GPTQ)
    with pytest.raises(ConfigError, match="quant_method 'gptq' is not supported; this family reads mxfp4"):
        spec_from_config(config)
