"""Hybrid execution on the CPU: misses computed on the host from the host tier's records are exact
against the resident run at every budget, promotions land and are hit, prefill-sized steps fetch,
and what the settings cannot do is a named error."""

import pytest
import torch

from moeinf import LLM, SamplingParams
from moeinf.errors import OffloadConfigError
from tests.checkpoints import save_tiny, save_tiny_mixtral

L, E = 4, 8
PROMPTS = [[5, 9, 13, 2, 7], list(range(3, 40)), [17]]  # the second is prefill-sized (> 32 tokens)
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hybrid")
    save_tiny_mixtral(folder, seed=5, num_local_experts=E, num_hidden_layers=L)
    return folder


def run(folder, dtype, **settings):
    with LLM(folder, progress=False, dtype=dtype, **settings) as llm:
        tokens = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        logits = llm.logits(PROMPTS[0])
    return tokens, logits, llm.stats()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("budget", [E, 0.5])
@pytest.mark.parametrize("host_compute", ["always", "auto"])
@pytest.mark.parametrize("policy", ["lru", "activation-aware"])
def test_host_computed_misses_equal_the_resident_run(folder, tmp_path, dtype, budget, host_compute, policy):
    tokens, logits, _ = run(folder, dtype)
    settings = dict(expert_budget=budget, host_budget=1.0, host_compute=host_compute, policy=policy)
    got_tokens, got_logits, stats = run(folder, dtype, offload_dir=tmp_path, **settings)
    assert got_tokens == tokens and torch.equal(got_logits, logits)
    assert stats["host_computed"] > 0 and stats["promotions"] > 0 and stats["promotion_hits"] > 0
    assert stats["prefill_misses"] > 0  # the 37-token prompt is prefill-sized: its misses are fetched


def test_biased_experts_from_the_host_tier_are_exact(tmp_path):
    save_tiny("gpt_oss", tmp_path / "model", seed=1)
    tokens, logits, _ = run(tmp_path / "model", "float32")
    settings = dict(expert_budget=6, host_budget=1.0, host_compute="always", offload_dir=tmp_path / "store")
    got_tokens, got_logits, stats = run(tmp_path / "model", "float32", **settings)
    assert got_tokens == tokens and torch.equal(got_logits, logits) and stats["host_computed"] > 0


def test_never_fetches_every_miss_and_auto_without_a_host_tier_does_too(folder, tmp_path):
    for settings in (dict(host_compute="never", host_budget=1.0), dict(host_compute="auto", host_budget=0)):
        _, _, stats = run(folder, "float32", expert_budget=E, offload_dir=tmp_path, **settings)
        assert stats["host_computed"] == 0 and stats["decode_misses"] > 0


def test_what_hybrid_cannot_do_is_named(folder, tmp_path):
    with pytest.raises(OffloadConfigError, match="host_compute: expected one of auto, never, always, found 'gpu'"):
        LLM(folder, progress=False, host_compute="gpu")
    with pytest.raises(OffloadConfigError, match="expected host_budget to hold at least one layer's 8 expert records"):
        LLM(folder, progress=False, expert_budget=E, host_budget=4, host_compute="always", offload_dir=tmp_path)


def test_the_device_share_in_triton_beside_the_host_share_matches_the_resident_run(folder, tmp_path):
    """kernels='triton': the device's experts in Triton (its interpreter here, CUDA on a GPU), the
    host's on the host kernels beside them (kernels/hybrid_experts.py), as on CUDA: host-computed
    experts round differently, so the logits agree within float32's tolerance and greedy tokens
    are identical."""
    prompts, params = [[5, 9, 13, 2, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True)

    def triton_run(**settings):
        with LLM(folder, progress=False, dtype="float32", kernels="triton", **settings) as llm:
            return llm.generate(prompts, params)[0].token_ids, llm.logits(prompts[0]), llm.stats()

    tokens, logits, _ = triton_run()
    settings = dict(expert_budget=E, host_budget=1.0, host_compute="always", offload_dir=tmp_path)
    got_tokens, got_logits, stats = triton_run(**settings)
    assert stats["host_computed"] > 0
    assert got_tokens == tokens
    assert (got_logits - logits).abs().max() < 1e-4 * logits.abs().max()
