"""GPTQ and compressed-tensors (pack-quantized) MoE checkpoints, opened as they are by Checkpoint.

The checkpoints are tiny Mixtral and Qwen3-MoE models saved by transformers and quantized as
GPTQModel / AutoGPTQ and llm-compressor save them (tests/quant_checkpoints.py): attention, expert
and dense MLP projections packed, routers, embeddings, norms and the lm head left as they are.
Oracles: quant_formats.dequantize_gptq (from GPTQ's definition, sharing no code with the
unpacking) and compressed-tensors' own decompressor. Weights compare exactly (an integer of at
most 8 bits times a 16-bit scale is a float32); an expert's output on the packed form, where the
summation order differs, within float32 rounding.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeinf.errors import ConfigError, MissingTensorError, TensorDtypeError, TensorShapeError
from moeinf.kernels.quantize import dequantize
from moeinf.loaders.checkpoint import Checkpoint, PackedExpert
from moeinf.loaders.expert_format import ExpertFormat
from moeinf.loaders.expert_record import RecordLayout, keeps_native_format, pack_record, record_views
from moeinf.loaders.quant_formats import WHY_NOT
from moeinf.models.family import EXPERT_ROLES
from moeinf.runtime.dense_weights import DenseWeights
from tests.quant_checkpoints import (
    dequantized_copy,
    oracle_weights,
    quantized_module,
    save_tiny_compressed_tensors,
    save_tiny_gptq,
)

GPTQ, CT = "gptq", "compressed-tensors"
FP16, BF16 = torch.float16, torch.bfloat16
BUILDERS = {GPTQ: save_tiny_gptq, CT: save_tiny_compressed_tensors}
# case -> (method, the builder's arguments)
CASES = {
    "gptq-4bit-sym-g32": (GPTQ, dict(bits=4, group_size=32, sym=True)),
    "gptq-4bit-asym-g32-v1": (GPTQ, dict(bits=4, group_size=32, sym=False, writer="autogptq")),
    "gptq-4bit-desc_act": (GPTQ, dict(bits=4, group_size=32, sym=True, desc_act=True, writer="autogptq")),
    "gptq-4bit-asym-desc_act-v2": (
        GPTQ,
        dict(bits=4, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
    ),
    "gptq-4bit-channel": (GPTQ, dict(bits=4, group_size=-1, sym=True)),
    "gptq-8bit-channel": (GPTQ, dict(bits=8, group_size=-1, sym=True)),
    "ct-w4a16-g32": (CT, dict(bits=4, group_size=32, symmetric=True)),
    "ct-w4a16-g32-asym": (CT, dict(bits=4, group_size=32, symmetric=False)),
    "ct-w8a16-channel": (CT, dict(bits=8, group_size=None, symmetric=True)),
    # quant_formats' "int8 grouped": 8-bit with groups or zero points, records of their own
    "gptq-8bit-g32": (GPTQ, dict(bits=8, group_size=32, sym=True)),
    "gptq-8bit-channel-asym": (GPTQ, dict(bits=8, group_size=-1, sym=False)),
    "ct-w8a16-g32": (CT, dict(bits=8, group_size=32, symmetric=True)),
}
# int4 with one scale per channel: records in groups of gcd(hidden 64, expert_ffn), the scale repeated
CHANNEL_GROUP = {"mixtral": 32, "qwen3_moe": 64}  # expert_ffn 96 and 64


def native_format(family: str, case: str) -> ExpertFormat:
    return {
        "gptq-4bit-sym-g32": ExpertFormat("int4", group_size=32, scale_dtype=FP16),
        "gptq-4bit-asym-g32-v1": ExpertFormat("int4", group_size=32, symmetric=False, scale_dtype=FP16),
        "gptq-4bit-desc_act": ExpertFormat("int4", group_size=32, scale_dtype=FP16, input_perm=True),
        "gptq-4bit-asym-desc_act-v2": ExpertFormat(
            "int4", group_size=32, symmetric=False, scale_dtype=FP16, input_perm=True
        ),
        "gptq-4bit-channel": ExpertFormat("int4", group_size=CHANNEL_GROUP[family], scale_dtype=FP16),
        "gptq-8bit-channel": ExpertFormat("int8"),
        "ct-w4a16-g32": ExpertFormat("int4", group_size=32, scale_dtype=BF16),
        "ct-w4a16-g32-asym": ExpertFormat("int4", group_size=32, symmetric=False, scale_dtype=BF16),
        "ct-w8a16-channel": ExpertFormat("int8"),
        "gptq-8bit-g32": ExpertFormat("int8", group_size=32, scale_dtype=FP16),
        "gptq-8bit-channel-asym": ExpertFormat("int8", group_size=None, symmetric=False, scale_dtype=FP16),
        "ct-w8a16-g32": ExpertFormat("int8", group_size=32, scale_dtype=BF16),
    }[case]


class Built(NamedTuple):
    folder: Path
    exact: dict[str, torch.Tensor]  # the builder's exact float weights, by weight name


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(family, method, seed=..., **builder arguments) -> Built, each checkpoint written once."""
    cache: dict[str, Built] = {}

    def make(family: str, method: str, seed: int = 0, **kwargs) -> Built:
        key = json.dumps([family, method, seed, kwargs], sort_keys=True)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{method}")
            cache[key] = Built(folder, BUILDERS[method](family, folder, seed=seed, **kwargs))
        return cache[key]

    return make


@pytest.fixture(scope="module")
def case_checkpoint(build):
    def make(family: str, case: str) -> Built:
        method, kwargs = CASES[case]
        return build(family, method, seed=list(CASES).index(case), **kwargs)

    return make


def expert_names(checkpoint: Checkpoint, moe_layer: int, expert: int) -> list[str]:
    layer = checkpoint.spec.moe_layers[moe_layer]
    return [checkpoint.family.tensor_name(role, layer, expert) for role in EXPERT_ROLES]


def every_expert(checkpoint: Checkpoint):
    return [(m, e) for m in range(checkpoint.spec.num_moe_layers) for e in range(checkpoint.spec.num_experts)]


def file_perm(tensors: dict[str, torch.Tensor], weight_name: str, inputs: int) -> torch.Tensor:
    """The act order a packed module's g_idx gives (its groups made contiguous), from the file."""
    module = weight_name.removesuffix(".weight")
    g_idx = tensors.get(f"{module}.g_idx", tensors.get(f"{module}.weight_g_idx"))
    return torch.arange(inputs) if g_idx is None else torch.argsort(g_idx.long(), stable=True)


def swiglu(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = x @ w13.T
    ffn = w13.shape[0] // 2
    return (torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:]) @ w2.T


def rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


FAMILIES = ("mixtral", "qwen3_moe")
each_case = pytest.mark.parametrize("case", list(CASES))
each_family = pytest.mark.parametrize("family", FAMILIES)


# ---------------------------------------------------------------------------------------------
# opened as they are, against the oracles


@each_case
@each_family
def test_opens_with_its_native_expert_format(family, case, case_checkpoint):
    built = case_checkpoint(family, case)
    checkpoint = Checkpoint.open(built.folder)
    method = CASES[case][0]
    assert checkpoint.spec.quantization == method and checkpoint.scheme.method == method
    assert checkpoint.native_expert_format() == native_format(family, case)
    assert checkpoint.native_expert_format() == native_format(family, case)  # the scan is kept
    # the builders' exact weights are what the oracle dequantizes the files to
    oracle = oracle_weights(built.folder)
    assert oracle.keys() == built.exact.keys()
    assert all(torch.equal(oracle[name], built.exact[name]) for name in oracle)


@each_case
@each_family
def test_expert_weights_equal_the_oracle(family, case, case_checkpoint):
    built = case_checkpoint(family, case)
    checkpoint = Checkpoint.open(built.folder)
    oracle = oracle_weights(built.folder)
    for moe_layer, expert in every_expert(checkpoint):
        gate, up, down = expert_names(checkpoint, moe_layer, expert)
        weights = checkpoint.expert_weights(moe_layer, expert)
        assert weights.w13.dtype == torch.float32 and weights.b13 is None and weights.b2 is None
        assert torch.equal(weights.w13, torch.cat([oracle[gate], oracle[up]]))
        assert torch.equal(weights.w2, oracle[down])


@each_case
@each_family
def test_packed_expert_is_the_oracle_bit_for_bit(family, case, case_checkpoint):
    built = case_checkpoint(family, case)
    checkpoint = Checkpoint.open(built.folder)
    oracle = oracle_weights(built.folder)
    tensors = load_file(built.folder / "model.safetensors")
    native = checkpoint.native_expert_format()
    spec = checkpoint.spec
    gen = torch.Generator().manual_seed(1)
    permuted = 0
    for moe_layer, expert in every_expert(checkpoint):
        gate, up, down = expert_names(checkpoint, moe_layer, expert)
        packed = checkpoint.packed_expert(moe_layer, expert)
        assert isinstance(packed, PackedExpert)
        assert packed.w13.shape == (2 * spec.expert_ffn, spec.hidden_size)
        assert packed.w2.shape == (spec.hidden_size, spec.expert_ffn)
        assert packed.w13.format == packed.w2.format == native.kind
        if native.grouped:
            assert packed.w13.group_size == native.group_size_for(spec.hidden_size)
            assert packed.w2.group_size == native.group_size_for(spec.expert_ffn)
            assert packed.w13.symmetric == packed.w2.symmetric == native.symmetric
            assert packed.w13.scale_dtype == packed.w2.scale_dtype == native.scale_dtype
        if packed.input_perm is None:  # the identity, also in a format with input_perm
            assert packed.expert_format == replace(native, input_perm=False)
        else:
            assert native.input_perm and packed.expert_format == native
            assert packed.input_perm.dtype == torch.int64 and packed.input_perm.shape == (spec.hidden_size,)
            permuted += 1
        # w13 packs [gate; up] with both row sets in down's act order, columns in gate's / up's
        input_order = file_perm(tensors, gate, spec.hidden_size)
        rows = file_perm(tensors, down, spec.expert_ffn)
        assert torch.equal(input_order, file_perm(tensors, up, spec.hidden_size))
        identity = torch.equal(input_order, torch.arange(spec.hidden_size))
        assert (packed.input_perm is None) == identity
        w13 = torch.cat([oracle[gate][rows], oracle[up][rows]])[:, input_order]
        assert torch.equal(dequantize(packed.w13), w13)
        assert torch.equal(dequantize(packed.w2), oracle[down][:, rows])
        # the expert's output, x gathered once by input_perm and nothing between w13 and w2
        x = torch.randn(5, spec.hidden_size, generator=gen)
        reference = swiglu(torch.cat([oracle[gate], oracle[up]]), oracle[down], x)
        gathered = x if packed.input_perm is None else x[:, packed.input_perm]
        mine = swiglu(dequantize(packed.w13), dequantize(packed.w2), gathered)
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-4)
    assert (permuted > 0) == native.input_perm


@each_case
@each_family
def test_dense_reads_equal_the_oracle(family, case, case_checkpoint):
    built = case_checkpoint(family, case)
    checkpoint = Checkpoint.open(built.folder)
    oracle = oracle_weights(built.folder)
    tensors = load_file(built.folder / "model.safetensors")
    spec, fam = checkpoint.spec, checkpoint.family
    packed = 0
    reads = [(role, None) for role in fam.global_roles(spec)]
    reads += [(role, layer) for layer in range(spec.num_layers) for role in fam.layer_roles(spec, layer)]
    for role, layer in reads:
        name = fam.tensor_name(role, layer)
        got = checkpoint.read(role, layer)
        if name in oracle:
            assert got.dtype == torch.float32 and torch.equal(got, oracle[name]), name
            packed += 1
        else:
            assert quantized_module(name, tensors[name].shape) is None, name  # routers, norms, embeddings
            assert torch.equal(got, tensors[name]), name
    dense_mlp = spec.num_layers - spec.num_moe_layers
    assert packed == 4 * spec.num_layers + 3 * dense_mlp  # q, k, v, o everywhere; gate, up, down of dense layers
    # the runtime's dense weights load from it unchanged
    dense = DenseWeights.load(checkpoint, torch.device("cpu"), torch.float32, progress=False)
    qkv = [oracle[fam.tensor_name(role, 0)] for role in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(dense.layers[0].qkv, torch.cat(qkv))


def test_float_checkpoint_has_no_native_format(tiny_mixtral):
    folder, _ = tiny_mixtral
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.scheme is None and checkpoint.native_expert_format() is None


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "phimoe"])
def test_other_families_with_per_expert_linears(family, build):
    """The same code reads every family whose experts are per-expert linear modules: Qwen2-MoE's
    shared expert, OLMoE's full-width q/k norms, PhiMoE's biases stay float beside packed weights."""
    built = build(family, GPTQ, seed=7, bits=4, group_size=32, sym=False)
    checkpoint = Checkpoint.open(built.folder)
    assert checkpoint.native_expert_format() == ExpertFormat("int4", group_size=32, symmetric=False, scale_dtype=FP16)
    oracle = oracle_weights(built.folder)
    gate, up, down = expert_names(checkpoint, 1, 2)
    weights = checkpoint.expert_weights(1, 2)
    assert torch.equal(weights.w13, torch.cat([oracle[gate], oracle[up]])) and torch.equal(weights.w2, oracle[down])
    packed = checkpoint.packed_expert(1, 2)
    assert torch.equal(dequantize(packed.w13), weights.w13) and torch.equal(dequantize(packed.w2), weights.w2)
    dense = DenseWeights.load(checkpoint, torch.device("cpu"), torch.float32, progress=False)
    if family == "qwen2_moe":
        layer = checkpoint.spec.moe_layers[0]
        shared = [oracle[checkpoint.family.tensor_name(role, layer)] for role in ("shared_gate", "shared_up")]
        assert torch.equal(dense.layers[layer].shared_w13, torch.cat(shared))


# ---------------------------------------------------------------------------------------------
# the float copy, for transformers


@pytest.mark.parametrize("family, case", [("mixtral", "gptq-4bit-desc_act"), ("qwen3_moe", "ct-w4a16-g32-asym")])
def test_dequantized_copy(family, case, case_checkpoint, tmp_path):
    built = case_checkpoint(family, case)
    weights = dequantized_copy(built.folder, tmp_path / "float")
    copy = load_file(tmp_path / "float" / "model.safetensors")
    quantized = load_file(built.folder / "model.safetensors")
    assert weights.keys() == built.exact.keys()
    for name, exact in built.exact.items():
        assert copy[name].dtype == torch.float32 and torch.equal(copy[name], exact), name
    kept = {name for name in quantized if name in copy}
    assert all(torch.equal(copy[name], quantized[name]) for name in kept)
    assert set(copy) == kept | set(built.exact)  # no packed tensor left behind
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    original = json.loads((built.folder / "config.json").read_text())
    assert "quantization_config" not in config and config == {
        k: v for k, v in original.items() if k != "quantization_config"
    }
    assert (tmp_path / "float" / "generation_config.json").exists()
    # moeinf reads the copy as a float checkpoint with the same experts
    float_checkpoint, checkpoint = Checkpoint.open(tmp_path / "float"), Checkpoint.open(built.folder)
    assert float_checkpoint.scheme is None and float_checkpoint.native_expert_format() is None
    assert torch.equal(float_checkpoint.expert_weights(1, 3).w13, checkpoint.expert_weights(1, 3).w13)
    # and transformers loads it with every weight in place
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    q_proj = checkpoint.family.tensor_name("q_proj", 0)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, built.exact[q_proj])


# ---------------------------------------------------------------------------------------------
# what is refused, and how

EXPERT = "model.layers.1.block_sparse_moe.experts.2"  # Mixtral; its w3 is [96, 64]


@pytest.fixture
def broken(case_checkpoint, tmp_path):
    """A writable copy of a Mixtral case."""

    def make(case: str) -> Path:
        return Path(shutil.copytree(case_checkpoint("mixtral", case).folder, tmp_path / case))

    return make


@pytest.mark.parametrize(
    "case, change, error, message",
    [
        (
            "gptq-4bit-sym-g32",
            lambda t: t.update({f"{EXPERT}.w3.qweight": t[f"{EXPERT}.w3.qweight"][:, :64].contiguous()}),
            TensorShapeError,
            rf"'{EXPERT}.w3.qweight' should have shape \[8, 96\].*found \[8, 64\]",
        ),
        (
            "gptq-4bit-sym-g32",
            lambda t: t.update({f"{EXPERT}.w2.qzeros": t[f"{EXPERT}.w2.qzeros"][:2].contiguous()}),
            TensorShapeError,
            rf"'{EXPERT}.w2.qzeros' should have shape \[3, 8\].*found \[2, 8\]",
        ),
        (
            "gptq-4bit-sym-g32",
            lambda t: t.update({f"{EXPERT}.w1.scales": t[f"{EXPERT}.w1.scales"].float()}),
            TensorDtypeError,
            rf"'{EXPERT}.w1.scales' should be one of F16, BF16.*found F32",
        ),
        (
            "gptq-4bit-sym-g32",
            lambda t: t.pop("model.layers.0.self_attn.o_proj.qzeros"),
            MissingTensorError,
            r"expected model.layers.0.self_attn.o_proj.qzeros",
        ),
        (
            "ct-w4a16-g32-asym",
            lambda t: t.update({f"{EXPERT}.w1.weight_packed": t[f"{EXPERT}.w1.weight_packed"][:64].contiguous()}),
            TensorShapeError,
            rf"'{EXPERT}.w1.weight_packed' should have shape \[96, 8\]",
        ),
        (
            "ct-w4a16-g32-asym",
            lambda t: t.pop(f"{EXPERT}.w2.weight_zero_point"),
            MissingTensorError,
            rf"expected {EXPERT}.w2.weight_zero_point",
        ),
    ],
    ids=["qweight-shape", "qzeros-shape", "scales-dtype", "qzeros-missing", "weight_packed-shape", "zero-missing"],
)
def test_bad_packed_tensors_are_named_at_open(case, change, error, message, broken):
    folder = broken(case)
    rewrite(folder, change)
    with pytest.raises(error, match=message):
        Checkpoint.open(folder)


def test_gate_and_up_in_different_formats(build):
    # GPTQModel's dynamic rules give the up projections 8 bits: readable as floats, no one record format
    built = build("mixtral", GPTQ, seed=21, bits=4, group_size=32, dynamic={r"+:.*\.w3$": {"bits": 8}})
    checkpoint = Checkpoint.open(built.folder)
    with pytest.raises(ConfigError, match=r"must share bits.*found bits 4 \(.*experts\.0\.w1\.weight\) and 8 .*w3"):
        checkpoint.native_expert_format()
    with pytest.raises(ConfigError, match=r"expert 0 of MoE layer 0.*bits 4 .* and 8.*expert_dtype"):
        checkpoint.packed_expert(0, 0)
    oracle = oracle_weights(built.folder)
    gate, up, down = expert_names(checkpoint, 0, 0)
    weights = checkpoint.expert_weights(0, 0)
    assert torch.equal(weights.w13, torch.cat([oracle[gate], oracle[up]])) and torch.equal(weights.w2, oracle[down])


def test_gate_and_up_in_different_act_orders(build):
    built = build("mixtral", GPTQ, seed=22, bits=4, group_size=32, desc_act=True, shared_input_order=False)
    checkpoint = Checkpoint.open(built.folder)
    assert checkpoint.native_expert_format().input_perm
    with pytest.raises(ConfigError, match=r"expert 3 of MoE layer 1 \(decoder layer 1\).*gate and up.*one act order"):
        checkpoint.packed_expert(1, 3)
    oracle = oracle_weights(built.folder)
    gate, up, _ = expert_names(checkpoint, 1, 3)
    assert torch.equal(checkpoint.expert_weights(1, 3).w13, torch.cat([oracle[gate], oracle[up]]))


@pytest.mark.parametrize("case", ["gptq-8bit-g32", "gptq-8bit-channel-asym", "ct-w8a16-g32"])
@each_family
def test_int8_grouped_records_hold_the_oracle_as_packed(family, case, case_checkpoint):
    """8-bit with groups or zero points (quant_formats' "int8 grouped") has records of its own:
    the store's records, written from the packed experts (never requantized), dequantize to the
    oracle's weights bit for bit."""
    built = case_checkpoint(family, case)
    checkpoint = Checkpoint.open(built.folder)
    native = checkpoint.native_expert_format()
    assert native.kind == "int8" and native.grouped and native == native_format(family, case)
    assert native.name == {"gptq-8bit-g32": "int8-g32", "gptq-8bit-channel-asym": "int8-channel-asym"}.get(
        case, "int8-g32-bf16"
    )
    layout = RecordLayout.for_format(checkpoint.spec.hidden_size, checkpoint.spec.expert_ffn, native)
    assert keeps_native_format(checkpoint, native)
    oracle = oracle_weights(built.folder)
    records = torch.zeros(3, layout.record_nbytes, dtype=torch.uint8)
    experts = [(0, 1), (1, 0), (1, checkpoint.spec.num_experts - 1)]
    for row, (moe_layer, expert) in enumerate(experts):
        pack_record(checkpoint, layout, moe_layer, expert, records[row].numpy())
    views = record_views(records, layout)
    assert views.w13.grouped_int8 and views.w13.q.dtype == torch.int8 and views.w13.scale.dtype == native.scale_dtype
    assert (views.w13.zero is None) == native.symmetric
    for row, (moe_layer, expert) in enumerate(experts):
        gate, up, down = expert_names(checkpoint, moe_layer, expert)
        assert torch.equal(dequantize(views.w13[row]), torch.cat([oracle[gate], oracle[up]]))
        assert torch.equal(dequantize(views.w2[row]), oracle[down])


def test_8_bit_groups_with_no_records_are_refused_but_read_as_floats(build):
    built = build("mixtral", GPTQ, seed=23, bits=8, group_size=16, sym=True)
    checkpoint = Checkpoint.open(built.folder)
    message = r"8-bit in groups of 16, expected groups a multiple of 32 .*expert_dtype='int8' or 'int4'"
    with pytest.raises(ConfigError, match=message):
        checkpoint.native_expert_format()
    with pytest.raises(ConfigError, match="8-bit in groups of 16"):
        checkpoint.packed_expert(0, 1)
    oracle = oracle_weights(built.folder)
    gate, up, down = expert_names(checkpoint, 0, 1)
    weights = checkpoint.expert_weights(0, 1)
    assert torch.equal(weights.w13, torch.cat([oracle[gate], oracle[up]])) and torch.equal(weights.w2, oracle[down])
    q_proj = checkpoint.family.tensor_name("q_proj", 1)
    assert torch.equal(checkpoint.read("q_proj", 1), oracle[q_proj])


def test_experts_left_unquantized_have_no_native_format(build):
    # GPTQModel's "-:" rule leaves the experts float: attention packed, experts as they are
    built = build("mixtral", GPTQ, seed=24, bits=4, group_size=32, dynamic={"-:.*experts.*": {}})
    checkpoint = Checkpoint.open(built.folder)
    assert checkpoint.native_expert_format() is None
    with pytest.raises(ConfigError, match=r"expert 0 of MoE layer 0.*found .*experts\.0\.w1\.weight stored as a float"):
        checkpoint.packed_expert(0, 0)
    oracle = oracle_weights(built.folder)
    assert not any("experts" in name for name in oracle)
    assert torch.equal(checkpoint.read("o_proj", 0), oracle[checkpoint.family.tensor_name("o_proj", 0)])


def test_config_and_file_must_agree_on_what_is_quantized(broken):
    folder = broken("ct-w4a16-g32")
    edit_config(folder, lambda c: c["quantization_config"]["ignore"].append(r"re:.*experts\.2\..*"))
    with pytest.raises(ConfigError, match=r"holds .*experts\.2\.w1\.weight_packed.*leaves .* unquantized"):
        Checkpoint.open(folder)


@pytest.mark.parametrize(
    "quantization",
    [
        {"bits": 4, "group_size": 64, "quant_method": "awq", "version": "gemm", "zero_point": True},
        {"quant_method": "gguf"},
        {"quant_method": "bitsandbytes", "_load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    ],
    ids=["awq", "gguf", "bitsandbytes"],
)
def test_other_methods_are_refused_saying_why(quantization, tiny_mixtral, tmp_path):
    folder = Path(shutil.copytree(tiny_mixtral[0], tmp_path / "ckpt"))
    edit_config(folder, lambda c: c.update(quantization_config=quantization))
    method = quantization["quant_method"]
    with pytest.raises(ConfigError, match=rf"quant_method '{method}' is not supported \({WHY_NOT[method]}\)"):
        Checkpoint.open(folder)
