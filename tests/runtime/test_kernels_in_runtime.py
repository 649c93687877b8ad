"""The runtime with its Triton kernels (run by Triton's CPU interpreter) against the runtime with
their torch references, on every family's tiny checkpoint, offloaded: the kernels see the slot
tables, strides, biases, activations and routing rules the runtime really hands them, which the
kernel tests (synthetic inputs) cannot show. On a GPU the same wiring runs on CUDA tensors."""

import pytest

from moeinf import LLM, SamplingParams
from moeinf.errors import RequestError
from moeinf.kernels.block_configs import interpreting
from tests.checkpoints import FAMILIES, save_tiny

PROMPTS = [[7, 3, 55, 21, 9, 14, 80, 33, 3, 61, 47], [12, 5, 90]]

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


def run(folder, store, kernels: str, dtype: str):
    """(logits of the first prompt [S, V], greedy tokens of both prompts, stats) at a 30% budget
    (50% for the tiny Mixtral, whose 30% is under one layer of experts)."""
    budget = 0.5 if folder.name == "mixtral" else 0.3
    with LLM(folder, progress=False, dtype=dtype, expert_budget=budget, offload_dir=store, kernels=kernels) as llm:
        logits = llm.logits(PROMPTS[0])
        outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True))
        return logits, [o.token_ids for o in outs], llm.stats()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_runtime_with_triton_kernels_matches_torch_references(name, tmp_path):
    folder = tmp_path / name
    save_tiny(name, folder, seed=7)
    expected, expected_tokens, _ = run(folder, tmp_path / "store", "torch", "float32")
    got, tokens, stats = run(folder, tmp_path / "store", "triton", "float32")
    assert stats["misses"] > 0  # experts really streamed through the slot pool
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert tokens == expected_tokens


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])  # plain SwiGLU; biases and the clamped SwiGLU
def test_runtime_with_triton_kernels_in_bfloat16(name, tmp_path):
    """bfloat16 tiles, upcast to float32 in the interpreter (whose bf16 arithmetic is wrong). The
    kernels keep gate, up and the activation in float32 where the references round each to
    bfloat16, so the two bf16 runs differ by more than either's rounding (0.02-0.08 here, as bf16
    flips routing in these sharp random models); what must hold is that the kernels are no further
    from the float32 run than the references are. A wrong kernel lands near 1."""
    folder = tmp_path / name
    save_tiny(name, folder, seed=7)
    exact, _, _ = run(folder, tmp_path / "store", "torch", "float32")
    errors = {}
    for kernels in ("torch", "triton"):
        got, _, _ = run(folder, tmp_path / "store", kernels, "bfloat16")
        errors[kernels] = ((got - exact).norm() / exact.norm()).item()
    assert errors["triton"] < max(2 * errors["torch"], 0.05), errors


def test_kernel_choice_is_checked(tiny_mixtral, monkeypatch):
    folder, _ = tiny_mixtral
    with pytest.raises(RequestError, match="expected kernels one of auto, triton, torch; found 'cuda'"):
        LLM(folder, progress=False, kernels="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RequestError, match="TRITON_INTERPRET=1"):
        LLM(folder, progress=False, kernels="triton")


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_runtime_with_triton_quantized_kernels(expert_dtype, tmp_path):
    """int8 / int4 records through quant_moe.fused_quant_moe (w8a16 / w4a16, dequantized in the K
    loop) against the torch reference on the dequantized records: offloaded at a 50% budget, and
    with a host tier, where the device's share runs in Triton beside the host kernels' share."""
    folder = tmp_path / "mixtral"
    save_tiny("mixtral", folder, seed=7, num_local_experts=6, num_hidden_layers=4)
    settings = dict(expert_dtype=expert_dtype, offload_dir=tmp_path / "store", dtype="float32")
    results = {}
    for kernels, extra in (("torch", {}), ("triton", {}), ("triton-hybrid", dict(host_budget=1.0))):
        budget = dict(expert_budget=6) if extra else dict(expert_budget=0.5, host_compute="never")
        with LLM(folder, progress=False, kernels=kernels.split("-")[0], **settings, **budget, **extra) as llm:
            logits = llm.logits(PROMPTS[0])
            outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True))
            results[kernels] = logits, [o.token_ids for o in outs], llm.stats()
    expected, expected_tokens, _ = results["torch"]
    for kernels in ("triton", "triton-hybrid"):
        got, tokens, stats = results[kernels]
        assert stats["misses" if kernels == "triton" else "host_computed"] > 0, kernels
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5, kernels
        assert tokens == expected_tokens, kernels
