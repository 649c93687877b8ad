"""moeinf against transformers on tiny random Mixtral checkpoints: float32 logits within 1e-4
relative error and identical greedy tokens, single prompts and batches of different lengths."""

import pytest
import torch

from moeinf import LLM, SamplingParams
from tests.checkpoints import save_tiny_mixtral

# Each variant stresses one thing the executor must get right.
VARIANTS = {
    "gqa-top2-single-file": {},  # 4 query heads share 2 KV heads
    "mha-top1-sharded": dict(num_key_value_heads=4, num_experts_per_tok=1, max_shard_size="40KB"),
    "odd-vocab-wide-head-tied": dict(vocab_size=97, head_dim=24, tie_word_embeddings=True),  # q_dim != hidden
    "sliding-window": dict(sliding_window=8),  # the window binds within the test's sequences
    "eight-experts-top3-deep": dict(num_local_experts=8, num_experts_per_tok=3, num_hidden_layers=4),
}

PROMPT = [7, 3, 55, 21, 9, 14, 80, 33, 3, 61, 47, 12, 5, 90, 28, 16, 72, 4, 39, 11, 50, 23]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    overrides = dict(VARIANTS[request.param])
    shard = overrides.pop("max_shard_size", None)
    model = save_tiny_mixtral(folder, seed=len(request.param), max_shard_size=shard, **overrides)
    return model, LLM(folder, progress=False)


def test_logits_match_transformers(pair):
    model, llm = pair
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    got = llm.logits(PROMPT)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert relative_error(got, expected) < 1e-4


def test_greedy_tokens_match_transformers(pair):
    model, llm = pair
    expected = hf_greedy(model, PROMPT, 20)
    (out,) = llm.generate([PROMPT], SamplingParams(max_new_tokens=20))
    assert out.token_ids == expected
    assert out.finish_reason == ("eos" if len(expected) < 20 else "length")


def test_batch_of_different_lengths_matches_transformers(pair):
    model, llm = pair
    prompts = [PROMPT[:3], PROMPT, PROMPT[5:12], [42]]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=20))
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == hf_greedy(model, prompt, 20)


def test_sharded_and_single_file_give_identical_logits(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    save_tiny_mixtral(single, seed=3)
    save_tiny_mixtral(sharded, seed=3, max_shard_size="30KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = LLM(single, progress=False).logits(PROMPT)
    b = LLM(sharded, progress=False).logits(PROMPT)
    assert torch.equal(a, b)
