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
