"""Generation behaviour beyond conformance: sampling, stopping, batching, text, bad requests."""

import json
import re

import numpy as np
import pytest
import torch

from moeinf import LLM, SamplingParams
from moeinf.errors import RequestError, TokenizerError
from moeinf.loaders.default_model import build_byte_tokenizer
from tests.checkpoints import save_tiny_mixtral

PROMPTS = [[5, 9, 13], [21, 34, 55, 89, 44, 33, 22, 11], [17]]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    save_tiny_mixtral(folder, seed=11)
    return LLM(folder, progress=False)


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    """A tiny Mixtral whose vocabulary is the default model's byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("text")
    save_tiny_mixtral(folder, seed=12, vocab_size=259, bos_token_id=1, eos_token_id=2)
    build_byte_tokenizer().save(str(folder / "tokenizer.json"))
    return LLM(folder, progress=False)


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    a = [o.token_ids for o in llm.generate(PROMPTS, params)]
    b = [o.token_ids for o in llm.generate(PROMPTS, params)]
    c = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(**{**vars(params), "seed": 8}))]
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_reduce_to_greedy(llm):
    greedy = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_new_tokens=10))]
    top_k = SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1, seed=1)
    top_p = SamplingParams(max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=1)
    assert [o.token_ids for o in llm.generate(PROMPTS, top_k)] == greedy
    assert [o.token_ids for o in llm.generate(PROMPTS, top_p)] == greedy


def test_sampled_tokens_stay_inside_top_k(llm):
    logits = llm.logits(PROMPTS[1])[-1]
    allowed = set(torch.topk(logits, 3).indices.tolist())
    for seed in range(20):
        (out,) = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=1, temperature=5.0, top_k=3, seed=seed))
        assert out.token_ids[0] in allowed


def test_batch_equals_one_prompt_at_a_time(llm):
    params = SamplingParams(max_new_tokens=15, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(PROMPTS, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_on_token_sees_every_token_as_it_is_generated(llm):
    prompts = [[5, 9, 13], [17], list(range(3, 20))]
    seen = []
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=5), on_token=lambda *event: seen.append(event))
    for i, out in enumerate(outputs):
        mine = [(token, reason) for place, token, reason in seen if place == i]
        assert [token for token, _ in mine] == out.token_ids
        assert [reason for _, reason in mine] == [None] * (len(out.token_ids) - 1) + [out.finish_reason]
    # step by step: every sequence's first token before any second one
    assert [place for place, _, _ in seen[:3]] == [0, 1, 2]


def test_eos_stops_a_sequence_and_ignore_eos_does_not(tmp_path):
    save_tiny_mixtral(tmp_path, seed=11)
    (first,) = LLM(tmp_path, progress=False).generate([PROMPTS[0]], SamplingParams(max_new_tokens=1))
    eos = first.token_ids[0]
    # generation_config.json decides which tokens end a sequence: make it the first greedy token
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 0]}))
    llm = LLM(tmp_path, progress=False)
    assert llm.spec.eos_token_ids == (eos, 0)
    (stopped,) = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8))
    (kept,) = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert stopped.token_ids == [eos] and stopped.finish_reason == "eos"
    assert len(kept.token_ids) == 8 and kept.finish_reason == "length"


def test_logits_of_prefix_equal_prefix_of_logits(llm):
    full = llm.logits(PROMPTS[1])
    head = llm.logits(PROMPTS[1][:4])
    torch.testing.assert_close(full[:4], head, rtol=1e-5, atol=1e-5)


def test_stats_count_prefill_and_decode_tokens(llm):
    before = llm.stats()
    llm.generate(PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True))
    after = llm.stats()
    assert after["prefill_tokens"] - before["prefill_tokens"] == sum(map(len, PROMPTS))
    assert after["decode_tokens"] - before["decode_tokens"] == 4 * len(PROMPTS)  # first token comes from prefill
    assert after["decode_s"] > before["decode_s"]


def test_text_prompts_round_trip_through_the_tokenizer(text_llm):
    ids = text_llm.encode("héllo, experts")
    assert ids[0] == 1  # the post-processor's <s>
    assert text_llm.codec.decode(ids) == "héllo, experts"
    (out,) = text_llm.generate("héllo, experts", SamplingParams(max_new_tokens=6))
    assert out.prompt_token_ids == ids
    assert out.text == text_llm.codec.decode(out.token_ids)


def test_text_prompt_without_tokenizer_is_refused(llm):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        llm.generate(["some text"])


@pytest.mark.parametrize(
    "prompt, message",
    [([], "at least one token"), ([3, 1000], r"\[0, 101\)"), ([-1], r"\[0, 101\)")],
)
def test_bad_prompts_are_refused(llm, prompt, message):
    with pytest.raises(RequestError, match=message):
        llm.generate([prompt])


def test_prompt_longer_than_the_model_is_refused(llm):
    with pytest.raises(RequestError, match="exceeds the model's 512 positions"):
        llm.generate([[3] * 500], SamplingParams(max_new_tokens=20))


@pytest.mark.parametrize(
    "kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_params_are_refused(kwargs):
    with pytest.raises(RequestError, match="SamplingParams: expected"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "hot"),
        ("temperature", float("nan")),
        ("temperature", True),
        ("top_p", None),
        ("top_p", "0.5"),
        ("top_k", 2.0),
        ("top_k", True),
        ("max_new_tokens", True),
        ("max_new_tokens", 4.0),
        ("seed", "x"),
        ("seed", 1.5),
        ("seed", True),
        ("seed", 10**30),
        ("seed", -(2**63) - 1),
        ("ignore_eos", "no"),
    ],
)
def test_sampling_params_of_the_wrong_kind_name_the_field(field, value):
    with pytest.raises(
        RequestError, match=rf"SamplingParams: expected {field} to be .*, found {re.escape(repr(value))}"
    ):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("seed", [-(2**63), 0, 2**64 - 1])  # the ends of what torch.Generator takes
def test_every_seed_the_generator_takes_is_accepted(llm, seed):
    (out,) = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed))
    assert len(out.token_ids) >= 1


@pytest.mark.parametrize(
    "prompt, found",
    [([1.5], "1.5"), ([3, True], "True"), ([3, "7"], "'7'"), ([torch.tensor(2.0)], "tensor"), (1.5, "float")],
)
def test_token_ids_must_be_integers(llm, prompt, found):
    with pytest.raises(RequestError, match=rf"expected .*token ids.*integers.*found .*{re.escape(found)}"):
        llm.generate([prompt])
    with pytest.raises(RequestError):
        llm.logits(prompt)


def test_integer_token_ids_of_numpy_and_torch_are_taken_as_ints(llm):
    ids = [5, 9, 13]
    want = llm.generate([ids], SamplingParams(max_new_tokens=3))[0].token_ids
    (np_out,) = llm.generate([np.array(ids)], SamplingParams(max_new_tokens=3))
    (torch_out,) = llm.generate([torch.tensor(ids)], SamplingParams(max_new_tokens=3))
    assert np_out.token_ids == torch_out.token_ids == want
    assert np_out.prompt_token_ids == ids and all(type(t) is int for t in np_out.prompt_token_ids)


def test_bad_device_and_dtype_are_refused(tiny_mixtral):
    folder, _ = tiny_mixtral
    with pytest.raises(RequestError, match="dtype"):
        LLM(folder, dtype="float8", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(RequestError, match="no CUDA device"):
            LLM(folder, device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_the_same_path_as_cpu(tiny_mixtral):
    folder, _ = tiny_mixtral
    cpu = LLM(folder, device="cpu", dtype="float32", progress=False)
    cuda = LLM(folder, device="cuda", dtype="float32", progress=False)
    torch.testing.assert_close(cuda.logits(PROMPTS[1]), cpu.logits(PROMPTS[1]), rtol=1e-4, atol=1e-4)
    params = SamplingParams(max_new_tokens=10)
    assert [o.token_ids for o in cuda.generate(PROMPTS, params)] == [o.token_ids for o in cpu.generate(PROMPTS, params)]
