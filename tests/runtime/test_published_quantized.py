"""Published quantized checkpoints served as they are (expert_dtype "auto"): GPTQ and compressed-
tensors pack-quantized tiny Mixtral and Qwen3-MoE checkpoints. Their experts go to records bit for
bit (never requantized), dense layers are dequantized on load; the run matches transformers on the
oracle-dequantized float checkpoint (float32 logits within 1e-4, greedy identical), and offloaded
runs equal the resident run bit for bit."""

import pytest
import torch

from moeinf import LLM, SamplingParams
from moeinf.errors import ConfigError
from moeinf.loaders.expert_record import keeps_native_format
from tests.quant_checkpoints import dequantized_copy, save_tiny_compressed_tensors, save_tiny_gptq
from tests.runtime.test_conformance import PROMPT, hf_greedy, relative_error

PROMPTS = [[5, 9, 13, 2, 7], list(range(3, 40)), [17]]
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)
# name: (builder, its settings, the records' format name)
CHECKPOINTS = {
    "gptq-int4-sym": (save_tiny_gptq, dict(bits=4, group_size=32, sym=True), "int4-g32"),
    "gptq-int4-asym-v1": (
        save_tiny_gptq,
        dict(bits=4, group_size=32, sym=False, writer="autogptq"),
        "int4-g32-asym",
    ),  # fmt: skip
    "gptq-int4-desc-act": (
        save_tiny_gptq,
        dict(bits=4, group_size=32, sym=True, desc_act=True, writer="autogptq"),
        "int4-g32-perm",
    ),  # fmt: skip
    "gptq-int8-channel": (save_tiny_gptq, dict(bits=8, group_size=-1, sym=True), "int8"),
    "ct-w4a16-sym": (save_tiny_compressed_tensors, dict(bits=4, group_size=32, symmetric=True), "int4-g32-bf16"),
    "ct-w4a16-asym": (
        save_tiny_compressed_tensors,
        dict(bits=4, group_size=32, symmetric=False),
        "int4-g32-asym-bf16",
    ),  # fmt: skip
    "ct-w8a16-channel": (save_tiny_compressed_tensors, dict(bits=8, group_size=None, symmetric=True), "int8"),
    # quant_formats' "int8 grouped": 8-bit with groups or zero points, in grouped int8 records
    "gptq-int8-g32": (save_tiny_gptq, dict(bits=8, group_size=32, sym=True), "int8-g32"),
    "gptq-int8-channel-asym": (save_tiny_gptq, dict(bits=8, group_size=-1, sym=False), "int8-channel-asym"),
    "ct-w8a16-g32": (save_tiny_compressed_tensors, dict(bits=8, group_size=32, symmetric=True), "int8-g32-bf16"),
}
FAMILIES = ("mixtral", "qwen3_moe")


@pytest.fixture(scope="module", params=[(f, c) for f in FAMILIES for c in CHECKPOINTS], ids=lambda p: "-".join(p))
def published(request, tmp_path_factory):
    family, name = request.param
    folder = tmp_path_factory.mktemp(f"{family}-{name}")
    builder, settings, format_name = CHECKPOINTS[name]
    builder(family, folder / "quantized", seed=2, **settings)
    dequantized_copy(folder / "quantized", folder / "float")
    return folder, format_name


def test_published_checkpoint_matches_transformers_on_its_dequantized_weights(published):
    import transformers

    folder, format_name = published
    llm = LLM(folder / "quantized", progress=False)
    assert llm.expert_format.name == format_name
    assert keeps_native_format(llm.checkpoint, llm.expert_format)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "float", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    assert relative_error(llm.logits(PROMPT), expected) < 1e-4
    (out,) = llm.generate([PROMPT], SamplingParams(max_new_tokens=12))
    assert out.token_ids == hf_greedy(model, PROMPT, 12)


def test_published_checkpoint_offloaded_equals_resident(published, tmp_path):
    folder, _ = published
    resident = LLM(folder / "quantized", progress=False)
    tokens = [o.token_ids for o in resident.generate(PROMPTS, PARAMS)]
    logits = resident.logits(PROMPTS[1])
    E = resident.spec.num_experts
    for setting in (dict(expert_budget=E, host_compute="never"), dict(expert_budget=E, host_budget=1.0)):
        with LLM(folder / "quantized", progress=False, offload_dir=tmp_path, **setting) as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == tokens, setting
            assert torch.equal(llm.logits(PROMPTS[1]), logits), setting


def test_a_published_checkpoint_dequantized_or_requantized_on_request(tmp_path):
    save_tiny_gptq("mixtral", tmp_path / "q", bits=4, group_size=32, sym=True, seed=4)
    dequantized_copy(tmp_path / "q", tmp_path / "f")
    float_run = LLM(tmp_path / "q", progress=False, expert_dtype="float32")  # dequantized experts
    assert float_run.expert_format.name == "float32"
    assert relative_error(float_run.logits(PROMPT), LLM(tmp_path / "f", progress=False).logits(PROMPT)) < 1e-6
    int8 = LLM(tmp_path / "q", progress=False, expert_dtype="int8")  # requantized from the dequantized weights
    assert int8.expert_format.name == "int8" and not keeps_native_format(int8.checkpoint, int8.expert_format)


def test_gptq_int8_with_groups_of_no_record_layout_asks_for_an_expert_dtype(tmp_path):
    save_tiny_gptq("mixtral", tmp_path / "q", bits=8, group_size=16, sym=True, seed=4)  # no multiple of 32
    with pytest.raises(ConfigError, match="8-bit in groups of 16.*expert_dtype"):
        LLM(tmp_path / "q", progress=False)
    llm = LLM(tmp_path / "q", progress=False, expert_dtype="int8")  # requantized per channel: it runs
    assert llm.generate([[3, 4]], SamplingParams(max_new_tokens=2))[0].token_ids
