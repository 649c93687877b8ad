"""DeepSeek-V2/V3 and GPT-OSS beyond the conformance tests: their configs as the published models
write them (old transformers layout), their attention scale and rope against transformers, the
config errors a user can hit, the fused-expert loader, latent-space attention, quantized
checkpoints as published (MXFP4, FP8), and `moeinf run` on every supported family."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeinf import LLM, SamplingParams
from moeinf.cli import main
from moeinf.errors import ConfigError, MissingTensorError
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.models.registry import spec_from_config
from moeinf.models.rope import inverse_frequencies
from tests.checkpoints import FAMILIES, save_tiny

# DeepSeek-V2-Lite's config.json (transformers 4 layout: rope_theta + rope_scaling with "type")
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "attention_bias": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 102400,
}

# gpt-oss-20b's config.json, less its quantization_config (its experts ship in MXFP4)
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "eos_token_id": 200002,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 201088,
}


def test_deepseek_v2_lite_config():
    family, spec = spec_from_config(DEEPSEEK_V2_LITE)
    assert family.name == "deepseek_v2"
    assert spec.moe_layers == tuple(range(1, 27)) and spec.dense_ffn == 10944
    assert (spec.num_experts, spec.top_k, spec.expert_ffn, spec.shared_expert_ffn) == (64, 6, 1408, 2816)
    assert spec.head_dim == 192 and spec.rope.rotary_dim == 64 and spec.attn_out_dim == 16 * 128
    assert spec.mla.q_lora_rank is None and spec.kv_a_dim == 576 and spec.kv_b_dim == 16 * 256
    assert spec.routing == "softmax_topk" and not spec.renormalize_topk and spec.router_fp32


# DeepSeek-V3's config.json as published (FP8 weights, MTP layer beyond num_hidden_layers, noaux_tc)
DEEPSEEK_V3 = {
    **{k: v for k, v in DEEPSEEK_V2_LITE.items() if k not in ("moe_layer_freq", "topk_method")},
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 3,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "moe_intermediate_size": 2048,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "vocab_size": 129280,
}  # fmt: skip


def test_deepseek_v3_config():
    family, spec = spec_from_config(DEEPSEEK_V3)
    assert family.name == "deepseek_v3" and spec.quantization == "fp8" and spec.quant_block == (128, 128)
    assert spec.moe_layers == tuple(range(3, 61)) and spec.num_moe_layers == 58  # the MTP layer is not served
    assert (spec.num_experts, spec.top_k, spec.n_group, spec.topk_group) == (256, 8, 8, 4)
    assert spec.routing == "sigmoid_grouped" and spec.renormalize_topk and spec.routed_scaling_factor == 2.5
    assert spec.router_correction_bias and spec.shared_expert_ffn == 2048 and spec.mla.q_lora_rank == 1536
    mscale = 0.1 * math.log(40) + 1.0
    assert spec.attention_scale == pytest.approx(192**-0.5 * mscale**2)


@pytest.mark.parametrize("arch", ["v2", "v3"])
def test_deepseek_attention_scale_and_rope_match_transformers(arch):
    """Yarn with mscale_all_dim scales the softmax by mscale**2 and cos/sin by mscale/mscale_all_dim;
    both must be transformers' numbers, or long-context logits drift."""
    import importlib

    import transformers

    config = dict(DEEPSEEK_V2_LITE, num_hidden_layers=2, hidden_size=256, intermediate_size=64, vocab_size=64)
    config.update(bos_token_id=0, eos_token_id=1)
    if arch == "v3":
        config.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", n_group=8, topk_group=4,
                      n_routed_experts=64, q_lora_rank=96)  # fmt: skip
    hf_config = getattr(transformers, f"Deepseek{arch.upper()}Config")(
        **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )
    modeling = importlib.import_module(f"transformers.models.deepseek_{arch}.modeling_deepseek_{arch}")
    attention = getattr(modeling, f"Deepseek{arch.upper()}Attention")
    rotary = getattr(modeling, f"Deepseek{arch.upper()}RotaryEmbedding")
    _, spec = spec_from_config(config)
    assert spec.attention_scale == pytest.approx(attention(hf_config, 0).scaling, rel=1e-12)
    expected = rotary(hf_config)
    inv_freq, scaling = inverse_frequencies(spec.rope)
    torch.testing.assert_close(inv_freq, expected.inv_freq, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(expected.attention_scaling, rel=1e-9)


def test_gpt_oss_20b_config():
    family, spec = spec_from_config(GPT_OSS_20B)
    assert family.name == "gpt_oss" and family.fused_experts
    assert spec.layer_windows == (128, None) * 12 and spec.window(0) == 128 and spec.window(1) is None
    assert (spec.num_experts, spec.top_k, spec.expert_ffn, spec.head_dim, spec.q_dim) == (32, 4, 2880, 64, 4096)
    assert spec.expert_bias and spec.router_bias and spec.attention_sinks and spec.attention_out_bias
    assert spec.expert_activation.kind == "clamped_swiglu" and spec.expert_activation.alpha == 1.702
    assert spec.rope.rope_type == "yarn" and spec.rope.get("truncate") is False
    assert spec.expert_params == 3 * 2880 * 2880 + 2 * 2880 + 2880
    bare = {k: v for k, v in GPT_OSS_20B.items() if k not in ("layer_types", "sliding_window")}
    assert spec_from_config(bare)[1].layer_windows == (128, None) * 12  # transformers' defaults


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(GPT_OSS_20B, quantization_config={"quant_method": "fp8"}), "quant_method 'fp8'.*reads mxfp4"),
        (dict(DEEPSEEK_V2_LITE, quantization_config={"quant_method": "awq"}), "quant_method 'awq'.*reads fp8"),
        (dict(DEEPSEEK_V2_LITE, quantization_config={"quant_method": "fp8"}), "weight_block_size.*per-tensor"),
        (dict(DEEPSEEK_V2_LITE, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128],
                                                     "fmt": "e5m2"}), "fmt 'e4m3'"),  # fmt: skip
        (dict(GPT_OSS_20B, quantization_config={"quant_method": "mxfp4"}, hidden_size=2888), "multiples of 32"),
        (dict(GPT_OSS_20B, layer_types=["sliding_attention"] * 3), "layer_types.*24"),
        (dict(GPT_OSS_20B, layer_types=["local"] * 24), "layer_types"),
        (dict(DEEPSEEK_V2_LITE, attention_bias=True), "attention_bias"),
        (dict(DEEPSEEK_V2_LITE, topk_method="noaux_tc"), "topk_method"),
        (dict(DEEPSEEK_V2_LITE, topk_method="group_limited_greedy", n_group=5), "n_group.*64 experts"),
        (dict(DEEPSEEK_V2_LITE, topk_method="group_limited_greedy", n_group=8, topk_group=9), "topk_group"),
        (dict(DEEPSEEK_V2_LITE, architectures=["DeepseekV3ForCausalLM"], n_group=64, topk_group=4), "least 2"),
        (dict(DEEPSEEK_V2_LITE, kv_lora_rank=0), "kv_lora_rank"),
        (dict(DEEPSEEK_V2_LITE, first_k_dense_replace=-1), "first_k_dense_replace"),
        (dict(DEEPSEEK_V2_LITE, first_k_dense_replace=27), "no layer has experts"),
    ],
)
def test_bad_configs_are_named_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_config(config)


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    return folder, save_tiny("gpt_oss", folder, seed=3)


def test_fused_experts_load_one_row_in_the_slot_layout(tiny_gpt_oss):
    """Expert e of a fused layer: gate rows then up rows (de-interleaved), down transposed to [D, F]."""
    folder, model = tiny_gpt_oss
    checkpoint = Checkpoint.open(folder)
    experts = model.model.layers[checkpoint.spec.moe_layers[2]].mlp.experts
    weights = checkpoint.expert_weights(2, 5)
    assert torch.equal(weights.w13, torch.cat([experts.gate_up_proj[5][:, 0::2].T, experts.gate_up_proj[5][:, 1::2].T]))
    assert torch.equal(weights.w2, experts.down_proj[5].T)
    bias = experts.gate_up_proj_bias[5]
    assert torch.equal(weights.b13, torch.cat([bias[0::2], bias[1::2]]))
    assert torch.equal(weights.b2, experts.down_proj_bias[5])
    name = checkpoint.family.tensor_name("experts_down", checkpoint.spec.moe_layers[2])
    with pytest.raises(MissingTensorError, match="no row 6"):
        checkpoint.index.read_row(name, 6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moeinf_run_serves_the_family_offloaded(family, tmp_path, capsys):
    """Every supported family through the command line, with half its experts on the device (the
    tiny Mixtral's 2 x 4 experts leave 30% below one layer)."""
    folder = tmp_path / family
    save_tiny(family, folder, seed=5)
    args = ["run", "--model", str(folder), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6"]
    assert main(args + ["--budget", "0.5", "--offload-dir", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "prompt ids: [5, 6, 7, 8]" in out
    assert int(re.search(r"(\d+) misses", out).group(1)) > 0  # the pool starts empty: experts streamed in


def save_mxfp4_gpt_oss(folder, seed: int):
    """A tiny GPT-OSS checkpoint laid out as OpenAI ships theirs: expert weights as random MXFP4
    blocks and scales, quantization_config mxfp4. Returns transformers' model holding the weights
    that transformers' own MXFP4 conversion dequantizes them to (the reference)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = save_tiny("gpt_oss", folder, seed=seed, intermediate_size=64)  # MXFP4 rows: multiples of 32
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            param = getattr(experts, proj)  # [E, in, out] (x @ W)
            E, rows, cols = param.shape[0], param.shape[2], param.shape[1]
            blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=generator)
            scales = torch.randint(122, 125, (E, rows, cols // 32), dtype=torch.uint8, generator=generator)
            with torch.no_grad():
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            name = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[name]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("budget", [None, 0.3])
def test_mxfp4_gpt_oss_matches_transformers_dequantization(budget, tmp_path):
    folder = tmp_path / "mxfp4"
    model = save_mxfp4_gpt_oss(folder, seed=11)
    prompt = [7, 3, 55, 21, 9, 14, 80, 33, 3, 61, 47, 12]
    with LLM(folder, progress=False, expert_budget=budget, offload_dir=tmp_path / "store") as llm:
        assert llm.spec.quantization == "mxfp4"
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0]
            hf_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
        got = llm.logits(prompt)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-4
        (out,) = llm.generate([prompt], SamplingParams(max_new_tokens=12))
        assert out.token_ids == hf_tokens.tolist()


@pytest.mark.parametrize(
    "S, new, window",
    [
        (9, 1, None),  # decode
        (9, 4, None),  # a short chunk: causality must hold per token, across the folded heads
        (12, 3, 5),  # a sliding window that binds
        (5, 5, None),  # a whole prompt
    ],
)
def test_latent_space_attention_equals_expanded_attention(S, new, window):
    """Weight absorption reorders MLA's arithmetic; it must compute the same attention."""
    from moeinf.models import mla
    from moeinf.models.attention import attend

    config = dict(DEEPSEEK_V2_LITE, num_attention_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=12)  # fmt: skip
    _, spec = spec_from_config(config)
    torch.manual_seed(S * 10 + new)
    weights = mla.MLAWeights(kv_a=torch.empty(0), kv_a_norm=torch.empty(0), kv_b=torch.randn(4 * 28, 24))
    cached = torch.randn(1, S, 24 + 8, dtype=torch.float64)
    q = torch.randn(new, 4, 24, dtype=torch.float64)
    weights.kv_b = weights.kv_b.double()
    k, v = mla.expand(cached, weights, spec)
    expected = attend(q, k, v, S - new, window, spec.attention_scale)
    got = mla.attend_latent(q, cached, weights, spec, S - new, window)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert mla.absorbed_is_cheaper(1, spec) and not mla.absorbed_is_cheaper(10_000, spec)


def save_fp8(family: str, folder, seed: int, block: tuple[int, int] = (16, 32)):
    """A tiny checkpoint of `family` laid out as the FP8 releases are: every eligible linear weight
    float8_e4m3fn with a float32 `_scale_inv` per block, quantization_config fp8. Returns the
    transformers model loaded from the weights transformers' own FP8 dequantization gives (the
    reference), and how many tensors were quantized."""
    import shutil

    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from moeinf.models.family import FP8_ROLES

    save_tiny(family, folder, seed=seed)
    checkpoint = Checkpoint.open(folder)
    names = [name for name, role in _roles_by_name(checkpoint.family, checkpoint.spec).items() if role in FP8_ROLES]
    tensors = load_file(folder / "model.safetensors")
    reference = dict(tensors)
    for name in names:
        weight = tensors[name].float()  # [N, K]
        rows, cols = weight.shape
        padded = torch.zeros(-(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1])
        padded[:rows, :cols] = weight
        blocks = padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
        scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # e4m3's largest value
        per_weight = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        tensors[name] = (weight / per_weight).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale_inv
        reference[name] = _dequantize_fp8_weight(tensors[name], scale_inv, list(block), torch.float32)
    reference_folder = folder.parent / f"{folder.name}-dequantized"
    shutil.copytree(folder, reference_folder)
    save_file(reference, reference_folder / "model.safetensors", metadata={"format": "pt"})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
                                     "activation_scheme": "dynamic"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    return model, len(names)


def _roles_by_name(family, spec) -> dict[str, str]:
    roles = {}
    for layer in range(spec.num_layers):
        roles.update({family.tensor_name(role, layer): role for role in family.layer_roles(spec, layer)})
    for layer in spec.moe_layers:
        roles.update(family.expert_tensor_names(spec, layer))
    return roles


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("budget", [None, 0.3])
def test_fp8_checkpoint_matches_transformers_dequantization(family, budget, tmp_path):
    folder = tmp_path / family
    model, quantized = save_fp8(family, folder, seed=13)
    assert quantized > 20  # attention, dense, shared and expert projections
    prompt = [7, 3, 55, 21, 9, 14, 80, 33, 3, 61, 47, 12]
    with LLM(folder, progress=False, expert_budget=budget, offload_dir=tmp_path / "store") as llm:
        assert llm.spec.quantization == "fp8" and llm.spec.quant_block == (16, 32)
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0]
            hf_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
        got = llm.logits(prompt)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-4
        (out,) = llm.generate([prompt], SamplingParams(max_new_tokens=12))
        assert out.token_ids == hf_tokens.tolist()


def test_fp8_weight_without_its_scales_is_a_named_error(tmp_path):
    folder = tmp_path / "fp8"
    save_fp8("deepseek_v3", folder, seed=2)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match="kv_b_proj.weight_scale_inv"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_deepseek_keys_left_out_take_transformers_defaults(arch):
    import transformers

    minimal = {"architectures": [arch], "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4,
               "vocab_size": 64, "num_experts_per_tok": 4}  # fmt: skip
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    hf = config_class(**{k: v for k, v in minimal.items() if k != "architectures"})
    _, spec = spec_from_config(minimal)
    assert spec.moe_layers == tuple(range(hf.first_k_dense_replace, 4))
    assert (spec.num_experts, spec.expert_ffn, spec.dense_ffn) == (hf.n_routed_experts, hf.moe_intermediate_size,
                                                                   hf.intermediate_size)  # fmt: skip
    assert spec.shared_expert_ffn == hf.moe_intermediate_size * hf.n_shared_experts
    assert (spec.mla.q_lora_rank, spec.mla.kv_lora_rank, spec.mla.v_head_dim) == (hf.q_lora_rank, hf.kv_lora_rank,
                                                                                 hf.v_head_dim)  # fmt: skip
    assert spec.routed_scaling_factor == hf.routed_scaling_factor and spec.max_position == hf.max_position_embeddings
    assert (spec.n_group, spec.topk_group) == ((hf.n_group, hf.topk_group) if hf.n_group else (1, 1))
