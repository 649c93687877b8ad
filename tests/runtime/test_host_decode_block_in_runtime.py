"""The executor's decode steps through the host decode block (Executor._decode_block_layers)
against the same steps through the per-op path (host_decode off), teacher-forced over one greedy
continuation: resident and offloaded (the pool's lookahead routes the residual stream the block
advances in place), one sequence and a batch of two, float32 and bfloat16."""

import pytest
import torch

from moeinf import LLM, SamplingParams
from moeinf.runtime.executor import Executor, Span
from tests.checkpoints import save_tiny

PROMPTS = [[7, 3, 55, 21, 9, 14, 80, 33, 3, 61, 47], [12, 5, 90]]
NEW = 6


def decode_logits(executor: Executor, prompts: list[list[int]], continuations: list[list[int]], blocks: bool):
    """Logits [NEW, B, V] of each decode step of the prompts' batch fed the given continuations."""
    saved = executor.host_decode
    executor.host_decode = saved if blocks else None
    try:
        caches = [executor.new_cache(64) for _ in prompts]
        executor.forward(torch.tensor(sum(prompts, [])), [Span(c, len(p)) for c, p in zip(caches, prompts)])
        steps = []
        for i in range(NEW):
            tokens = torch.tensor([c[i] for c in continuations])
            steps.append(executor.forward(tokens, [Span(c, 1) for c in caches]))
        return torch.stack(steps)
    finally:
        executor.host_decode = saved


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=NEW + 1, ignore_eos=True))]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    save_tiny("mixtral", folder, seed=3)
    return folder


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "batch"])
def test_decode_block_matches_the_per_op_path_in_float32(mixtral, prompts):
    with LLM(mixtral, progress=False, dtype="float32") as llm:
        assert llm.executor.host_decode is not None and llm.executor.resident_experts is not None
        continuations = greedy(llm, prompts)
        got = decode_logits(llm.executor, prompts, continuations, blocks=True)
        expected = decode_logits(llm.executor, prompts, continuations, blocks=False)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_resident_experts_computed_in_the_block_count_their_hits(mixtral):
    """The block computes resident experts without acquire(); the hits it reports are the ones the
    per-op path counts through acquire()."""
    with LLM(mixtral, progress=False, dtype="float32") as llm:
        counted, blocks = {}, llm.executor.host_decode
        for on in (True, False):
            llm.executor.host_decode = blocks if on else None
            before = llm.stats()["hits"]
            greedy(llm, PROMPTS)
            counted[on] = llm.stats()["hits"] - before
    assert counted[True] == counted[False] > 0


@pytest.mark.parametrize("policy", ["activation-aware", "activation-aware+lookahead"])
def test_decode_block_offloaded_equals_resident(mixtral, tmp_path, policy):
    with LLM(mixtral, progress=False, dtype="float32") as llm:
        resident = greedy(llm, PROMPTS)
    settings = dict(expert_budget=0.5, offload_dir=tmp_path, policy=policy)
    with LLM(mixtral, progress=False, dtype="float32", **settings) as llm:
        assert llm.executor.host_decode is not None
        assert llm.experts.wants_lookahead == policy.endswith("lookahead")
        offloaded = greedy(llm, PROMPTS)
        assert llm.stats()["misses"] > 0
    assert offloaded == resident


def test_decode_block_in_bfloat16_stays_within_bfloat16s_own_distance(mixtral):
    """The block rounds where torch does but sums in another order, so the two bfloat16 runs differ
    by bfloat16's ulps, carried through the layers; what must hold is that the block is no further
    from the float32 run than the per-op bfloat16 path is. A wrong block lands near 1."""
    with LLM(mixtral, progress=False, dtype="float32") as llm:
        continuations = greedy(llm, PROMPTS)
        exact = decode_logits(llm.executor, PROMPTS, continuations, blocks=False)
    with LLM(mixtral, progress=False, dtype="bfloat16") as llm:
        assert llm.executor.host_decode is not None
        errors = {
            blocks: ((decode_logits(llm.executor, PROMPTS, continuations, blocks) - exact).norm() / exact.norm()).item()
            for blocks in (True, False)
        }
    assert errors[True] < max(2 * errors[False], 0.05), errors


@pytest.mark.parametrize("family, kernels", [("qwen2_moe", "auto"), ("olmoe", "auto"), ("mixtral", "torch")])
def test_decode_block_is_off_where_it_cannot_run(family, kernels, tmp_path):
    """A shared expert and projection biases (Qwen2-MoE), q/k norms (OLMoE), the torch kernels."""
    save_tiny(family, tmp_path, seed=1)
    with LLM(tmp_path, progress=False, dtype="float32", kernels=kernels) as llm:
        assert llm.executor.host_decode is None
