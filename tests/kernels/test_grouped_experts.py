"""The CPU fast path for the routed experts (two grouped matmuls over the slot pool) against the
reference loop: bit for bit, whichever slot holds which expert."""

import math

import pytest
import torch

from moeinf.kernels import grouped_experts, host_experts
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.grouped_experts import moe_experts_grouped
from moeinf.kernels.ops import AUTO, Kernels
from moeinf.kernels.reference import moe_experts_reference

pytestmark = pytest.mark.skipif(not grouped_experts.AVAILABLE, reason="this torch has no torch._grouped_mm")

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=2.0)  # binds at these weights' scale
CASES = {
    # name: (T tokens, D, F, E experts, K); each says what it is there for
    "Mixtral-like": (16, 64, 96, 8, 2),
    "many experts, most idle": (5, 32, 48, 61, 4),  # prime E; S empty groups in the grouped call
    "top-k = E": (3, 32, 16, 4, 4),  # every expert in every token
    "two tokens": (2, 64, 32, 6, 2),  # the smallest batch the path takes
}


def inputs(T, D, FF, E, K, dtype, seed, spare_slots=3):
    """Experts in a permuted pool of E + spare_slots slots, the unused ones poisoned with NaN (a
    read of one shows); distinct experts per token. Returns x, ids, weights, w13, w2, slots,
    b13, b2."""
    g = torch.Generator().manual_seed(seed)
    S = E + spare_slots
    slots = torch.randperm(S, generator=g)[:E]  # [E] expert e lives in slot slots[e]
    w13 = torch.full((S, 2 * FF, D), float("nan"))
    w2 = torch.full((S, D, FF), float("nan"))
    b13, b2 = torch.full((S, 2 * FF), float("nan")), torch.full((S, D), float("nan"))
    w13[slots] = torch.randn(E, 2 * FF, D, generator=g) / math.sqrt(D)
    w2[slots] = torch.randn(E, D, FF, generator=g) / math.sqrt(FF)
    b13[slots], b2[slots] = 0.5 * torch.randn(E, 2 * FF, generator=g), 0.5 * torch.randn(E, D, generator=g)
    x = torch.randn(T, D, generator=g)
    weights, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), dim=-1), K)  # [T, K] each
    x, w13, w2, b13, b2 = (t.to(dtype) for t in (x, w13, w2, b13, b2))
    return x, ids, weights, w13, w2, slots, b13, b2


@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "biases+clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_grouped_equals_the_reference(case, dtype, biased):
    """The GEMMs equal F.linear's per group; the activation runs over all pairs at once where the
    reference runs it per expert, so a vectorised sigmoid may round an element differently:
    equal up to that (in practice bit for bit without the clamped activation)."""
    T, D, FF, E, K = CASES[case]
    x, ids, weights, w13, w2, slots, b13, b2 = inputs(T, D, FF, E, K, dtype, seed=len(case))
    extras = dict(b13=b13, b2=b2, activation=CLAMPED) if biased else dict(activation=SILU)
    assert grouped_experts.applies(x, w13, w2)
    got = moe_experts_grouped(x, ids, weights, w13, w2, slots, **extras)
    expected = moe_experts_reference(x, ids, weights, w13, w2, slots, **extras)
    assert got.dtype == dtype and not got.isnan().any()
    if biased:
        torch.testing.assert_close(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_slot_layout_never_changes_the_result(dtype):
    """The same experts in other permutations of slots (as in a resident run against an
    offloaded one): the same bits. Vectorised transcendentals (sigmoid, exp) may round an element
    differently by where it falls in a vector, so the element-wise work runs in expert order,
    whatever the slots; F = 24 leaves partial vectors."""
    T, D, FF, E, K = 7, 32, 24, 13, 3
    for seed in range(6):
        x, ids, weights, w13, w2, slots, b13, b2 = inputs(T, D, FF, E, K, dtype, seed=seed, spare_slots=4)
        extras = dict(activation=CLAMPED) if seed % 2 else dict(b13=b13, b2=b2, activation=CLAMPED)
        got = moe_experts_grouped(x, ids, weights, w13, w2, slots, **extras)
        if "b13" in extras:
            extras.update(b13=b13[slots], b2=b2[slots])
        identity = moe_experts_grouped(x, ids, weights, w13[slots], w2[slots], torch.arange(E), **extras)
        assert torch.equal(got, identity), seed


def test_all_tokens_to_one_expert_and_idle_experts():
    T, D, FF, E = 6, 32, 16, 5
    x, _, _, w13, w2, slots, _, _ = inputs(T, D, FF, E, 1, torch.float32, seed=2)
    ids = torch.full((T, 1), 3)
    ones = torch.ones(T, 1)
    got = moe_experts_grouped(x, ids, ones, w13, w2, slots)
    assert torch.equal(got, moe_experts_reference(x, ids, ones, w13, w2, slots))
    with pytest.raises(ValueError, match="moe_experts_grouped b13 and b2: expected both or neither, found b13 None"):
        moe_experts_grouped(x, ids, ones, w13, w2, slots, b2=torch.zeros(w2.shape[:2]))


def test_the_path_applies_only_where_it_can_run():
    x, w13, w2 = torch.zeros(4, 64), torch.zeros(3, 2 * 48, 64), torch.zeros(3, 64, 48)
    assert grouped_experts.applies(x, w13, w2)
    assert not grouped_experts.applies(x[:1], w13, w2)  # one token: the loop is faster
    # rows of 5 float32 (20 bytes): torch._grouped_mm needs strides in multiples of 16 bytes
    assert not grouped_experts.applies(x, torch.zeros(3, 10, 64), torch.zeros(3, 64, 5))
    assert not grouped_experts.applies(torch.zeros(4, 6), torch.zeros(3, 96, 6), torch.zeros(3, 6, 48))


def test_ops_take_the_grouped_path_for_batches_on_the_cpu(monkeypatch):
    """The torch kernels group from two tokens; the default ones only past the host expert kernels'
    decode-sized steps (host_experts.MAX_TOKENS)."""
    _, D, FF, E, K = CASES["Mixtral-like"]
    x, ids, weights, w13, w2, slots, _, _ = inputs(host_experts.MAX_TOKENS + 1, D, FF, E, K, torch.float32, seed=3)
    calls = []
    real = grouped_experts.moe_experts_grouped
    monkeypatch.setattr(grouped_experts, "moe_experts_grouped", lambda *a, **k: calls.append(1) or real(*a, **k))
    AUTO.moe_experts(x, ids, weights, w13, w2, slots)
    AUTO.moe_experts(x[:16], ids[:16], weights[:16], w13, w2, slots)
    AUTO.moe_experts(x[:1], ids[:1], weights[:1], w13, w2, slots)
    assert calls == [1]  # the prefill-sized batch, not the decode-sized ones
    Kernels("torch").moe_experts(x[:2], ids[:2], weights[:2], w13, w2, slots)
    Kernels("torch").moe_experts(x[:1], ids[:1], weights[:1], w13, w2, slots)
    assert calls == [1, 1]  # the batch, not the single token
