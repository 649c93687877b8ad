"""Quantized experts in the runtime (expert_dtype "int8" / "int4"): round-to-nearest records built
from a float checkpoint give the same tokens and logits, bit for bit, resident and offloaded at every
budget (the host tier's records computed by the host kernels included), and match transformers run
on the checkpoint whose experts are the records' dequantized weights."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeinf import LLM, SamplingParams
from moeinf.errors import ConfigError
from moeinf.kernels.quantize import dequantize
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_format import ExpertFormat, resolve_expert_format
from moeinf.loaders.expert_record import quantize_expert
from moeinf.loaders.expert_store import PREFIX
from tests.checkpoints import save_tiny
from tests.runtime.test_conformance import hf_greedy, relative_error

PROMPTS = [[5, 9, 13, 2, 7], list(range(3, 40)), [17]]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)
PROMPT = [7, 3, 55, 21, 9, 14, 80, 33, 3, 61, 47, 12, 5, 90, 28, 16, 72, 4, 39, 11, 50, 23]
# family -> overrides: an expert FFN width that int4's groups of 32 divide, at least 4 MoE layers
FAMILIES = {
    "mixtral": dict(num_local_experts=6, num_hidden_layers=4),
    "qwen3_moe": dict(moe_intermediate_size=64),
    "deepseek_v3": {},
}


def dequantized_copy(folder, copy, expert_dtype: str) -> None:
    """Writes to `copy` the checkpoint at `folder` with every routed expert's weights replaced by
    the float32 weights its RTN records in expert_dtype dequantize to (gate, up and down quantized
    as the record's w13 [2F, D] and w2 [D, F] rows are: row by row, so each on its own)."""
    checkpoint = Checkpoint.open(folder)
    spec, family = checkpoint.spec, checkpoint.family
    fmt = resolve_expert_format(expert_dtype, torch.float32)
    copy.mkdir()
    for file in folder.iterdir():
        if file.suffix != ".safetensors" and file.name != "model.safetensors.index.json":
            shutil.copy(file, copy / file.name)
    (file,) = folder.glob("*.safetensors")  # the tiny checkpoints are one file
    tensors = load_file(file)
    F = spec.expert_ffn
    for moe_layer, layer in enumerate(spec.moe_layers):
        for expert in range(spec.num_experts):
            weights = checkpoint.expert_weights(moe_layer, expert)
            quantized = quantize_expert(weights.w13.float(), weights.w2.float(), fmt)
            w13, w2 = dequantize(quantized.w13), dequantize(quantized.w2)
            for role, value in (("expert_gate", w13[:F]), ("expert_up", w13[F:]), ("expert_down", w2)):
                name = family.tensor_name(role, layer, expert)
                assert tensors[name].shape == value.shape
                tensors[name] = value.contiguous()
    save_file(tensors, copy / file.name, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, folder, seed=3, **FAMILIES[request.param])
    return folder


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_offloaded_quantized_run_equals_resident_run(folder, tmp_path, expert_dtype):
    resident = LLM(folder, progress=False, expert_dtype=expert_dtype)
    assert resident.experts.w13.format == expert_dtype
    tokens = [o.token_ids for o in resident.generate(PROMPTS, PARAMS)]
    logits = resident.logits(PROMPTS[1])
    E = resident.spec.num_experts
    settings = [
        dict(expert_budget=E, host_compute="never"),  # every miss fetched into a slot
        dict(expert_budget=0.5, policy="activation-aware+lookahead", host_compute="never"),
        dict(expert_budget=E, host_budget=1.0),  # misses computed from the host tier's records
    ]
    for setting in settings:
        with LLM(folder, progress=False, expert_dtype=expert_dtype, offload_dir=tmp_path, **setting) as llm:
            assert llm.experts.layout.format.name.startswith(expert_dtype)
            assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == tokens, setting
            assert torch.equal(llm.logits(PROMPTS[1]), logits), setting
            stats = llm.stats()
        assert stats["misses"] > 0
        if "host_budget" in setting:
            assert stats["host_computed"] > 0
        # the store's records are the quantized ones: a fraction of the float32 record
        float_record = 3 * llm.spec.hidden_size * llm.spec.expert_ffn * 4
        assert llm.experts.layout.payload_nbytes < float_record / (3.5 if expert_dtype == "int8" else 6)


@pytest.mark.parametrize("expert_dtype", ["int8", "int4", "int4-g64"])
def test_quantized_run_matches_transformers_on_the_dequantized_weights(folder, tmp_path, expert_dtype):
    import transformers

    if Checkpoint.open(folder).spec.expert_ffn % 64 and expert_dtype == "int4-g64":
        pytest.skip("groups of 64 do not divide this family's expert FFN width")
    llm = LLM(folder, progress=False, expert_dtype=expert_dtype)
    dequantized_copy(folder, tmp_path / "dequantized", expert_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    assert relative_error(llm.logits(PROMPT), expected) < 1e-4
    (out,) = llm.generate([PROMPT], SamplingParams(max_new_tokens=12))
    assert out.token_ids == hf_greedy(model, PROMPT, 12)
    # and the quantization is real: the float model's logits differ
    float_logits = LLM(folder, progress=False).logits(PROMPT)
    assert relative_error(llm.logits(PROMPT), float_logits) > 1e-3


def test_torch_kernels_with_a_host_tier_of_quantized_records(folder, tmp_path):
    # kernels="torch" runs the references, but the host tier's records need the host kernels
    resident = LLM(folder, progress=False, expert_dtype="int8", kernels="torch")
    tokens = [o.token_ids for o in resident.generate(PROMPTS, PARAMS)]
    E = resident.spec.num_experts
    settings = dict(expert_dtype="int8", kernels="torch", expert_budget=E, host_budget=1.0, offload_dir=tmp_path)
    with LLM(folder, progress=False, **settings) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        assert llm.stats()["host_computed"] > 0
    assert got == tokens


def test_bfloat16_compute_with_quantized_experts(folder, tmp_path):
    # bfloat16 dense layers, int4 experts computed in float32 and rounded once: offloaded equals resident
    resident = LLM(folder, progress=False, dtype="bfloat16", expert_dtype="int4")
    tokens = [o.token_ids for o in resident.generate(PROMPTS, PARAMS)]
    E = resident.spec.num_experts
    with LLM(
        folder, progress=False, dtype="bfloat16", expert_dtype="int4", expert_budget=E, offload_dir=tmp_path
    ) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == tokens


def test_expert_dtype_errors(folder):
    with pytest.raises(ConfigError, match="expert_dtype: expected one of auto, float32.*found 'int3'"):
        LLM(folder, progress=False, expert_dtype="int3")
    with pytest.raises(ConfigError, match="expected float32 .*found 'bfloat16'"):
        LLM(folder, progress=False, expert_dtype="bfloat16")  # float experts are in the compute dtype


def test_formats_the_records_have_no_layout_for_are_refused():
    with pytest.raises(ConfigError, match="int8 expert format: expected either symmetric weights with one float32"):
        ExpertFormat("int8", group_size=128)  # groups need 16-bit scales (grouped int8)
    with pytest.raises(ConfigError, match="grouped int8 expert format: expected float16 or bfloat16 scales"):
        ExpertFormat("int8", group_size=128, scale_dtype=torch.float32)
    with pytest.raises(ConfigError, match="int4 expert format: expected float16 or bfloat16 scales, found None"):
        ExpertFormat("int4", group_size=32)
    with pytest.raises(ConfigError, match="expected a kind among float, int8, int4, found 'int2'"):
        ExpertFormat("int2")
    assert (
        ExpertFormat("int4", group_size=None, symmetric=False, scale_dtype=torch.bfloat16).name
        == "int4-channel-asym-bf16"
    )
    assert ExpertFormat("int8", group_size=128, scale_dtype=torch.float16).name == "int8-g128"
    assert ExpertFormat("int8", symmetric=False, scale_dtype=torch.bfloat16, input_perm=True).name == (
        "int8-channel-asym-bf16-perm"
    )


def test_group_that_does_not_divide_the_inputs(tmp_path):
    folder = tmp_path / "model"
    save_tiny("mixtral", folder, intermediate_size=96)  # 96 inputs to w2: groups of 64 do not fit
    with pytest.raises(ConfigError, match="group size 64 to divide the 96 inputs of w2"):
        LLM(folder, progress=False, expert_dtype="int4-g64")


def test_quantized_store_sits_beside_the_float_one(tmp_path):
    folder = tmp_path / "model"
    save_tiny("mixtral", folder, num_local_experts=6, num_hidden_layers=4)
    for expert_dtype in ("auto", "int8", "int4"):
        with LLM(folder, progress=False, expert_dtype=expert_dtype, expert_budget=6, offload_dir=tmp_path / "s") as llm:
            llm.generate([[3, 4, 5]], SamplingParams(max_new_tokens=2))
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["experts-float32.moeinf", "experts-int4-g32.moeinf", "experts-int8.moeinf"]
    data = (tmp_path / "s" / "experts-int4-g32.moeinf").read_bytes()
    *_, length = PREFIX.unpack(data[: PREFIX.size])
    header = json.loads(data[PREFIX.size : PREFIX.size + length])
    assert header["format"]["kind"] == "int4" and header["format"]["group_size"] == 32
