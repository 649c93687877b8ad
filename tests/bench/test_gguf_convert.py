"""bench/gguf_convert.py's tensor plan: which GGML type each tensor of a Mixtral is written in, per
--type, checked on a tiny checkpoint without the `gguf` package (it lives only in the llama.cpp
benchmark's own environment; the files it writes are compared with llama.cpp by bench/llamacpp.py)."""

import re

import pytest
import torch

from bench import gguf_convert
from bench.gguf_convert import (
    DENSE,
    EXPERTS,
    KEEP_F32,
    TYPES,
    ConversionError,
    MixtralCheckpoint,
    tensor_count,
    tensor_type,
    tensors,
)
from bench.llamacpp import TYPES as BENCH_TYPES

ROUTED_EXPERTS = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")
ALWAYS_F32 = re.compile(r"(blk\.\d+\.(attn_norm|ffn_norm|ffn_gate_inp)|output_norm)\.weight")


@pytest.fixture(scope="module")
def plan(tiny_mixtral):
    """[(GGUF name, shape, role)] of the tiny Mixtral, in file order."""
    folder, _ = tiny_mixtral
    return [(name, tuple(tensor.shape), role) for name, tensor, role in tensors(MixtralCheckpoint(folder))]


def types_of(plan, type_name: str) -> dict[str, str]:
    return {name: tensor_type(type_name, name, role, shape) for name, shape, role in plan}


def test_every_tensor_once_with_its_role(plan, tiny_mixtral):
    _, model = tiny_mixtral
    names = [name for name, _, _ in plan]
    assert len(names) == len(set(names)) == tensor_count(model.config.to_dict())
    for name, _, role in plan:
        expected = EXPERTS if ROUTED_EXPERTS.fullmatch(name) else KEEP_F32 if ALWAYS_F32.fullmatch(name) else DENSE
        assert role == expected, name


def test_expert_stacks_are_the_experts_in_ggml_order(tiny_mixtral):
    folder, model = tiny_mixtral
    config = model.config
    by_name = {name: tensor for name, tensor, _ in tensors(MixtralCheckpoint(folder))}
    experts, hidden, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
    assert by_name["blk.1.ffn_gate_exps.weight"].shape == (experts, inner, hidden)
    assert by_name["blk.1.ffn_up_exps.weight"].shape == (experts, inner, hidden)
    assert by_name["blk.1.ffn_down_exps.weight"].shape == (experts, hidden, inner)
    block = model.model.layers[1].mlp.experts
    for e in range(experts):  # transformers' fused gate_up_proj [E, 2F, D] and down_proj [E, D, F]
        gate, up = block.gate_up_proj[e].detach().chunk(2, dim=0)
        torch.testing.assert_close(by_name["blk.1.ffn_gate_exps.weight"][e], gate, rtol=0, atol=0)
        torch.testing.assert_close(by_name["blk.1.ffn_up_exps.weight"][e], up, rtol=0, atol=0)
        torch.testing.assert_close(
            by_name["blk.1.ffn_down_exps.weight"][e], block.down_proj[e].detach(), rtol=0, atol=0
        )


@pytest.mark.parametrize("type_name, quantized", [("q8_0-experts", "Q8_0"), ("q4_0-experts", "Q4_0")])
def test_experts_types_quantize_only_the_routed_experts(plan, type_name, quantized):
    types = types_of(plan, type_name)
    assert {name for name, t in types.items() if t == quantized} == {
        name for name in types if ROUTED_EXPERTS.fullmatch(name)
    }
    assert set(types.values()) == {"F32", quantized}
    assert TYPES[type_name].experts_only


@pytest.mark.parametrize("type_name, matrices", [("f32", "F32"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_whole_model_types_keep_only_norms_and_router_f32(plan, type_name, matrices):
    types = types_of(plan, type_name)
    for name, t in types.items():
        assert t == ("F32" if ALWAYS_F32.fullmatch(name) else matrices), name
    assert not TYPES[type_name].experts_only


def test_quantized_rows_must_split_into_blocks():
    with pytest.raises(ConversionError, match="multiple of 32"):
        tensor_type("q4_0-experts", "blk.0.ffn_down_exps.weight", EXPERTS, (4, 64, 40))
    with pytest.raises(ConversionError, match="multiple of 32"):
        tensor_type("q8_0", "blk.0.attn_q.weight", DENSE, (64, 40))
    # kept float32, or a float type: any row length
    assert tensor_type("q4_0-experts", "blk.0.attn_q.weight", DENSE, (64, 40)) == "F32"
    assert tensor_type("bf16", "blk.0.ffn_down_exps.weight", EXPERTS, (4, 64, 40)) == "BF16"


def test_unknown_type_and_missing_gguf_are_named_errors(tiny_mixtral, tmp_path, monkeypatch):
    folder, _ = tiny_mixtral
    with pytest.raises(ConversionError, match="expected --type one of"):
        tensor_type("q4_k", "blk.0.attn_q.weight", DENSE, (64, 64))
    monkeypatch.setattr(gguf_convert, "gguf", None)
    with pytest.raises(ConversionError, match="gguf"):
        gguf_convert.convert(folder, tmp_path / "out.gguf", "q4_0-experts")
    assert not (tmp_path / "out.gguf").exists()


def test_every_benchmark_type_has_its_gguf_type():
    """bench/llamacpp.py's --types name converter types that exist, quantized ones experts only."""
    for name, spec in BENCH_TYPES.items():
        assert spec.gguf in TYPES, name
        assert TYPES[spec.gguf].experts_only == (spec.expert_dtype in ("int8", "int4")), name
