"""The Triton kernels against their torch references (kernels/reference.py).

On a machine without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on
CPU tensors; there the interpreter runs programs one by one, so the shapes are small and the
blocks large. Every output buffer is filled with NaN before a kernel runs, so an element no
program writes shows up. Low-precision results are judged by relative RMS error against a float64
evaluation of the same reference on the same (rounded) inputs.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as nnf
import triton
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moeinf.kernels import block_configs, moe, norm, reference, routing
from moeinf.kernels.block_configs import BlockConfig
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.tolerance import TOLERANCE, rel_rms

DEVICE = torch.device("cpu" if block_configs.interpreting() or not torch.cuda.is_available() else "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

UNWRITTEN = "NaN in the output: an element was never written"  # outputs start as NaN (poisoned)


def poisoned(*shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------------- experts


def slot_records(S: int, D: int, F: int, dtype, pad: int) -> tuple[torch.Tensor, ...]:
    """w13 [S, 2F, D], w2 [S, D, F], b13 [S, 2F] and b2 [S, D] as strided views into one NaN-filled
    record buffer, each slot a record of w13, w2, b13, then b2 at every other element, followed by
    `pad` unused elements, as the offload pool lays slots out. Reading anything outside a routed
    expert's weights and biases (a wrong slot, offset or stride) shows as NaN."""
    R = 2 * F * D + D * F + 2 * F + 2 * D + pad
    flat = torch.full((S * R,), float("nan"), dtype=dtype, device=DEVICE)
    w13 = flat.as_strided((S, 2 * F, D), (R, D, 1))
    w2 = flat.as_strided((S, D, F), (R, F, 1), 2 * F * D)
    b13 = flat.as_strided((S, 2 * F), (R, 1), 3 * F * D)
    b2 = flat.as_strided((S, D), (R, 2), 3 * F * D + 2 * F)  # column stride 2: NaN between elements
    return w13, w2, b13, b2


def biased_moe_case(T, D, F, E, K, dtype, seed, ids=None, gate_up_scale=1.0):
    """Inputs of one fused_moe call with biases: (x, ids, weights, w13, w2, slots, b13, b2), experts
    in a permuted slot table of S = E + 3 padded records. gate_up_scale: the std of the gate and up
    pre-activations (about), to push them past a clamp."""
    g = torch.Generator().manual_seed(seed)
    S = E + 3
    x = torch.randn(T, D, generator=g).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, ids.shape[1], generator=g), dim=-1)
    slots = torch.randperm(S, generator=g)[:E]  # expert e lives in slot slots[e]
    w13, w2, b13, b2 = slot_records(S, D, F, dtype, pad=13)
    # scaled so activations stay O(1) and the relative error measures rounding, not cancellation
    w13[slots] = (gate_up_scale * torch.randn(E, 2 * F, D, generator=g) / math.sqrt(D)).to(dtype).to(DEVICE)
    w2[slots] = (torch.randn(E, D, F, generator=g) / math.sqrt(F)).to(dtype).to(DEVICE)
    # drawn last, so the unbiased cases below see the same weights as before biases existed
    b13[slots] = (0.5 * gate_up_scale * torch.randn(E, 2 * F, generator=g)).to(dtype).to(DEVICE)
    b2[slots] = (0.5 * torch.randn(E, D, generator=g)).to(dtype).to(DEVICE)
    return [t.to(DEVICE) for t in (x, ids, weights)] + [w13, w2, slots.to(DEVICE), b13, b2]


def moe_case(T, D, F, E, K, dtype, seed, ids=None):
    """Inputs of one fused_moe call without biases: (x, ids, weights, w13, w2, slots)."""
    return biased_moe_case(T, D, F, E, K, dtype, seed, ids)[:6]


def moe_expected(x, ids, weights, w13, w2, slots, b13=None, b2=None, activation=SILU) -> torch.Tensor:
    x, weights, w13, w2 = (t.cpu().double() for t in (x, weights, w13, w2))
    b13, b2 = (None if b is None else b.cpu().double() for b in (b13, b2))
    return reference.moe_experts_reference(
        x, ids.cpu(), weights, w13, w2, slots.cpu(), b13=b13, b2=b2, activation=activation
    )


MOE_CASES = {
    # name: (T, D, F, E, K, ids or None for random distinct experts per token)
    "one token": (1, 64, 32, 8, 2, None),  # decode: every block but two is padding
    "fewer tokens than BLOCK_M": (5, 48, 40, 4, 2, None),  # each expert's run is mostly padding
    "odd K and N": (9, 33, 19, 4, 3, None),  # D, F and top-k odd: every tile edge is masked
    "prime experts": (23, 40, 24, 13, 2, None),  # E = 13: nothing lines up with a power of two
    "several row blocks": (37, 72, 40, 5, 2, None),  # 74 pairs: experts span several BLOCK_M rows
    # all 40 pairs on expert 2: one expert spans two row blocks, the other experts have none
    "all tokens to one expert": (40, 32, 24, 4, 1, torch.full((40, 1), 2)),
    "top-k = E": (9, 32, 24, 3, 3, None),  # every token uses every expert
    # 16 experts, tokens only ever routed to 0, 5 and 11: most of the slot table is never read
    "experts with no tokens": (12, 32, 24, 16, 2, torch.tensor([[0, 5], [11, 0], [5, 11]]).repeat(4, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MOE_CASES)
def test_fused_moe_matches_reference(case, dtype):
    T, D, F, E, K, ids = MOE_CASES[case]
    x, ids, weights, w13, w2, slots = moe_case(T, D, F, E, K, dtype, seed=len(case), ids=ids)
    out = moe.fused_moe(x, ids, weights, w13, w2, slots, out=poisoned(T, D, dtype=dtype))
    assert out.dtype == dtype and out.shape == (T, D)
    assert not out.isnan().any(), UNWRITTEN
    assert rel_rms(out, moe_expected(x, ids, weights, w13, w2, slots)) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "config",
    [
        BlockConfig(block_m=32, block_n=32, block_k=32, group_m=2),  # 2 column tiles of D, 2 steps over D
        BlockConfig(block_m=16, block_n=16, block_k=16, group_m=3),  # group_m not dividing the row blocks
    ],
    ids=["32-group2", "16-group3"],
)
def test_fused_moe_small_blocks_and_grouped_order(config):
    # several row and column tiles, several reduction steps and a ragged last group of row blocks
    x, ids, weights, w13, w2, slots = moe_case(37, 72, 40, 5, 2, torch.float32, seed=3)
    out = moe.fused_moe(x, ids, weights, w13, w2, slots, config=config, out=poisoned(37, 72, dtype=torch.float32))
    assert not out.isnan().any(), UNWRITTEN
    assert rel_rms(out, moe_expected(x, ids, weights, w13, w2, slots)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("case", ["one token", "all tokens to one expert", "experts with no tokens"])
def test_moe_stages_write_every_element(case):
    T, D, F, E, K, ids = MOE_CASES[case]
    x, ids, weights, w13, w2, slots = moe_case(T, D, F, E, K, torch.float32, seed=5, ids=ids)
    K = ids.shape[1]
    config = block_configs.heuristic_config(T, E, block_configs.device_name(DEVICE))
    blocks = moe.align_by_expert(ids, slots, config.block_m)
    # every pair appears once; every row block holds one expert's pairs (or padding only)
    pairs = blocks.sorted_pairs[blocks.sorted_pairs < T * K].sort().values
    assert torch.equal(pairs.cpu(), torch.arange(T * K, dtype=torch.int32))
    block_pairs = blocks.sorted_pairs.view(-1, config.block_m).long().cpu()
    for block, slot in enumerate(blocks.block_slots.tolist()):
        valid = block_pairs[block][block_pairs[block] < T * K]
        assert (slot == -1) == (len(valid) == 0)
        assert all(slots[ids.view(-1)[valid]].cpu() == slot)
    act = poisoned(T * K, F, dtype=torch.float32)
    moe.gate_up_act(x, w13, blocks, K, act, config, upcast=False)
    gate_up = torch.einsum("pd,pfd->pf", x.repeat_interleave(K, 0), w13[slots[ids.view(-1)]])  # [T*K, 2F]
    assert not act.isnan().any(), UNWRITTEN
    assert rel_rms(act, nnf.silu(gate_up[:, :F]) * gate_up[:, F:]) < TOLERANCE[torch.float32]
    y = poisoned(T * K, D, dtype=torch.float32)
    moe.down_weighted(act, w2, weights, blocks, y, config, upcast=False)
    expected_y = torch.einsum("pf,pdf->pd", act, w2[slots[ids.view(-1)]]) * weights.view(-1, 1)
    assert not y.isnan().any(), UNWRITTEN
    assert rel_rms(y, expected_y) < TOLERANCE[torch.float32]
    out = poisoned(T, D, dtype=torch.float32)
    moe.combine_topk(y, K, out)
    in_order = y.view(T, K, D)[:, 0].clone()
    for k in range(1, K):
        in_order += y.view(T, K, D)[:, k]
    assert torch.equal(out, in_order)  # k = 0 .. K-1, in float32, bit for bit


CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=7.0)  # GPT-OSS's values

BIAS_CASES = {
    # name: (T, D, F, E, K, gate_up_scale, activation, biases)
    "biases, silu": (37, 72, 40, 5, 2, 1.0, SILU, True),  # several row blocks and column tiles
    "biases, clamped": (37, 72, 40, 5, 2, 4.0, CLAMPED, True),  # GPT-OSS: pre-activations past the limit
    "clamped, no biases": (9, 33, 19, 4, 3, 4.0, CLAMPED, False),  # odd D and F: masked tile edges
    "odd sizes, biases, clamped": (9, 33, 19, 4, 3, 4.0, CLAMPED, True),  # masked bias loads
}


def clamp_binds(x, ids, w13, slots, b13, limit) -> bool:
    """Whether some routed pair's gate exceeds the limit and its up leaves [-limit, limit] both ways."""
    F = w13.shape[1] // 2
    pair_w13 = w13[slots[ids.reshape(-1)]].cpu().double()  # [T*K, 2F, D]
    h = torch.einsum("pd,pfd->pf", x.repeat_interleave(ids.shape[1], 0).cpu().double(), pair_w13)  # [T*K, 2F]
    if b13 is not None:
        h += b13[slots[ids.reshape(-1)]].cpu().double()
    gate, up = h[:, :F], h[:, F:]
    return bool((gate > limit).any() and (up > limit).any() and (up < -limit).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BIAS_CASES)
def test_fused_moe_biases_and_activation_match_reference(case, dtype):
    T, D, F, E, K, scale, activation, biases = BIAS_CASES[case]
    args = biased_moe_case(T, D, F, E, K, dtype, seed=len(case), gate_up_scale=scale)
    x, ids, weights, w13, w2, slots, b13, b2 = args
    if not biases:
        b13 = b2 = None
    config = BlockConfig(block_m=32, block_n=32, block_k=64, group_m=2)  # 2 column tiles of F = 40
    out = moe.fused_moe(
        x, ids, weights, w13, w2, slots, b13=b13, b2=b2, activation=activation, config=config,
        out=poisoned(T, D, dtype=dtype),
    )  # fmt: skip
    expected = moe_expected(x, ids, weights, w13, w2, slots, b13, b2, activation)
    assert out.dtype == dtype and out.shape == (T, D)
    assert not out.isnan().any(), UNWRITTEN
    assert rel_rms(out, expected) < TOLERANCE[dtype]
    if activation.kind == "clamped_swiglu":
        # the clamp binds, and the comparison would see an unclamped kernel
        assert clamp_binds(x, ids, w13, slots, b13, activation.limit)
        unclamped = ExpertActivation("clamped_swiglu", alpha=activation.alpha, limit=1e6)
        assert rel_rms(moe_expected(x, ids, weights, w13, w2, slots, b13, b2, unclamped), expected) > 0.05


def test_moe_stages_add_biases_before_activation_and_routing_weight():
    # the stages alone, against einsums: gate/up biases inside the activation, the down bias times
    # the routing weight
    x, ids, weights, w13, w2, slots, b13, b2 = biased_moe_case(12, 32, 24, 4, 2, torch.float32, seed=4)
    T, K, F, D = 12, 2, 24, 32
    config = BlockConfig(block_m=32, block_n=32, block_k=32, group_m=1)
    blocks = moe.align_by_expert(ids, slots, config.block_m)
    pair_slots = slots[ids.view(-1)]  # [T*K]
    act = poisoned(T * K, F, dtype=torch.float32)
    moe.gate_up_act(x, w13, blocks, K, act, config, upcast=False, b13=b13, activation=CLAMPED)
    h = torch.einsum("pd,pfd->pf", x.repeat_interleave(K, 0), w13[pair_slots]) + b13[pair_slots]  # [T*K, 2F]
    assert not act.isnan().any(), UNWRITTEN
    assert rel_rms(act, CLAMPED(h[:, :F], h[:, F:])) < TOLERANCE[torch.float32]
    y = poisoned(T * K, D, dtype=torch.float32)
    moe.down_weighted(act, w2, weights, blocks, y, config, upcast=False, b2=b2)
    expected_y = (torch.einsum("pf,pdf->pd", act, w2[pair_slots]) + b2[pair_slots]) * weights.view(-1, 1)
    assert not y.isnan().any(), UNWRITTEN
    assert rel_rms(y, expected_y) < TOLERANCE[torch.float32]


def test_fused_moe_is_deterministic():
    # no atomics: the same inputs give the same bits, whatever order the programs ran in
    args = moe_case(37, 72, 40, 5, 2, torch.float16, seed=7)
    assert torch.equal(moe.fused_moe(*args), moe.fused_moe(*args))


def test_shared_experts_as_extra_columns():
    # a shared MLP of ffn 2F, split into two F-wide always-routed experts with a per-token gate
    T, D, F, E, K = 11, 32, 24, 6, 2
    x, ids, weights, w13, w2, slots = moe_case(T, D, F, E, K, torch.float32, seed=11)
    g = torch.Generator().manual_seed(12)
    gate, up = torch.randn(2 * F, D, generator=g) / math.sqrt(D), torch.randn(2 * F, D, generator=g) / math.sqrt(D)
    down = torch.randn(D, 2 * F, generator=g) / math.sqrt(2 * F)
    shared_gate = torch.sigmoid(torch.randn(T, 1, generator=g))  # [T, 1], Qwen2-MoE style
    free = [s for s in range(w13.shape[0]) if s not in set(slots.tolist())]  # the 3 unused slots
    shared_slots = torch.tensor(free[:2], device=DEVICE)
    for piece, slot in enumerate(free[:2]):
        cols = slice(piece * F, (piece + 1) * F)
        w13[slot] = torch.cat([gate[cols], up[cols]]).to(DEVICE)
        w2[slot] = down[:, cols].contiguous().to(DEVICE)
    all_ids, all_weights, all_slots = moe.with_shared_experts(
        ids, weights, slots, shared_slots, shared_gate.expand(T, 2).contiguous().to(DEVICE)
    )
    assert all_ids.shape == (T, K + 2) and all_slots.shape == (E + 2,)
    got = moe.fused_moe(x, all_ids, all_weights, w13, w2, all_slots)
    xc = x.cpu()
    shared = shared_gate * nnf.linear(nnf.silu(nnf.linear(xc, gate)) * nnf.linear(xc, up), down)
    assert not got.isnan().any(), UNWRITTEN
    assert rel_rms(got, moe_expected(x, ids, weights, w13, w2, slots) + shared) < TOLERANCE[torch.float32]


def test_routed_expert_without_a_slot():
    x, ids, weights, w13, w2, slots = moe_case(6, 32, 24, 4, 2, torch.float32, seed=2)
    slots[ids[0, 0]] = -1
    with pytest.raises(ValueError, match="expert_slots of routed experts"):
        moe.fused_moe(x, ids, weights, w13, w2, slots)
    # past the launcher's check (on a GPU it is skipped, as it would sync), its rows come out NaN
    config = block_configs.heuristic_config(6, 4, block_configs.device_name(DEVICE))
    blocks = moe.align_by_expert(ids, slots, config.block_m)
    act, y = poisoned(12, 24, dtype=torch.float32), poisoned(12, 32, dtype=torch.float32)
    moe.gate_up_act(x, w13, blocks, 2, act, config, upcast=False)
    moe.down_weighted(act, w2, weights, blocks, y, config, upcast=False)
    unslotted = (ids.view(-1) == ids[0, 0]).cpu()
    assert y[unslotted].isnan().all() and not y[~unslotted].isnan().any()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"].half()), "w13 dtype"),
        (lambda a: a.update(ids=a["ids"].int()), "topk_ids dtype"),
        (lambda a: a.update(weights=a["weights"].half()), "topk_weights dtype"),
        (lambda a: a.update(w2=a["w2"][:, :-1]), "w2 shape"),
        (lambda a: a.update(ids=a["ids"][:-1]), "topk_ids shape"),
        (lambda a: a.update(ids=a["ids"] + 4), "topk_ids values"),
    ],
    ids=["x dtype", "ids dtype", "weights dtype", "w2 shape", "ids rows", "ids range"],
)
def test_fused_moe_rejects_bad_input(change, message):
    x, ids, weights, w13, w2, slots = moe_case(6, 32, 24, 4, 2, torch.float32, seed=2)
    args = dict(x=x, ids=ids, weights=weights, w13=w13, w2=w2, slots=slots)
    change(args)
    with pytest.raises(ValueError, match=message):
        moe.fused_moe(args["x"], args["ids"], args["weights"], args["w13"], args["w2"], args["slots"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(b2=None), "b13 and b2"),
        (lambda a: a.update(b13=None), "b13 and b2"),
        (lambda a: a.update(b13=a["b13"][:, :-1]), "b13 shape"),
        (lambda a: a.update(b13=a["b13"][:-1]), "b13 shape"),
        (lambda a: a.update(b2=a["b2"].half()), "b2 dtype"),
        (lambda a: a.update(b2=torch.zeros(a["b2"].shape, device="meta")), "b2 device"),
        (lambda a: a.update(b2=a["b2"][:, :, None]), "b2 shape"),
        (lambda a: a.update(activation="clamped_swiglu"), "activation"),
    ],
    ids=["b13 alone", "b2 alone", "b13 columns", "b13 slots", "b2 dtype", "b2 device", "b2 3-d", "activation"],
)
def test_fused_moe_rejects_bad_biases(change, message):
    x, ids, weights, w13, w2, slots, b13, b2 = biased_moe_case(6, 32, 24, 4, 2, torch.float32, seed=2)
    args = dict(b13=b13, b2=b2, activation=CLAMPED)
    change(args)
    with pytest.raises(ValueError, match=message):
        moe.fused_moe(x, ids, weights, w13, w2, slots, **args)


def test_moe_stages_reject_bad_biases():
    x, ids, weights, w13, w2, slots, b13, b2 = biased_moe_case(6, 32, 24, 4, 2, torch.float32, seed=2)
    config = block_configs.heuristic_config(6, 4, block_configs.device_name(DEVICE))
    blocks = moe.align_by_expert(ids, slots, config.block_m)
    act, y = poisoned(12, 24, dtype=torch.float32), poisoned(12, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="b13 shape"):
        moe.gate_up_act(x, w13, blocks, 2, act, config, upcast=False, b13=b2)
    with pytest.raises(ValueError, match="b2 dtype"):
        moe.down_weighted(act, w2, weights, blocks, y, config, upcast=False, b2=b2.double())
    with pytest.raises(ValueError, match="moe_experts_reference b13 and b2"):
        reference.moe_experts_reference(x, ids, weights, w13, w2, slots, b13=b13)


def test_fused_moe_no_tokens():
    x, ids, weights, w13, w2, slots = moe_case(1, 32, 24, 4, 2, torch.float32, seed=2)
    out = moe.fused_moe(x[:0], ids[:0], weights[:0], w13, w2, slots)
    assert out.shape == (0, 32)


# ---------------------------------------------------------------------------------------- routing


def tie_free_logits(T: int, E: int, dtype, seed: int) -> torch.Tensor:
    """[T, E] logits with distinct values 0.05 apart in every row: distinct after rounding to any
    of the dtypes (bf16's ulp below 8 is at most 1/32), so top-k has one answer."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float()
    return ((steps - E / 2) * 0.05 + 0.01 * torch.rand(T, 1, generator=g)).to(dtype).to(DEVICE)


SOFTMAX_CASES = {
    # name: (T, E, K, renormalize)
    "Mixtral": (19, 8, 2, True),
    "Qwen3-MoE": (9, 128, 8, True),
    "OLMoE, no renormalisation": (9, 64, 8, False),
    "one token": (1, 8, 2, True),
    "top-k = E": (7, 5, 5, False),  # the weights are the whole softmax, sorted
    "prime E, odd K": (13, 61, 3, True),  # E not a power of two: masked columns never chosen
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_softmax_topk_matches_reference(case, dtype):
    T, E, K, renormalize = SOFTMAX_CASES[case]
    logits = tie_free_logits(T, E, dtype, seed=len(case))
    ids, weights = torch.full((T, K), -1, device=DEVICE), poisoned(T, K, dtype=torch.float32)  # int64 holds no NaN
    routing.softmax_topk_into(logits, K, renormalize, ids, weights)
    expected_ids, expected_weights = reference.softmax_topk_reference(logits, K, renormalize)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-7)


def test_softmax_topk_returns_int64_ids():
    logits = tie_free_logits(5, 8, torch.float32, seed=0)
    assert routing.softmax_topk(logits, 2, True)[0].dtype == torch.int64


GROUPED_CASES = {
    # name: (T, E, K, n_group, topk_group, renormalize, scaling)
    "DeepSeek-V3": (7, 256, 8, 8, 4, True, 2.5),
    "one group": (9, 64, 6, 1, 1, True, 1.0),  # no group limit: plain sigmoid + bias top-k
    "groups of 15": (9, 60, 5, 4, 2, False, 1.5),  # group size not a power of two
    "top-k = kept experts": (5, 16, 8, 4, 2, True, 1.0),  # every expert of both kept groups
    "one token": (1, 32, 4, 4, 2, True, 2.0),
}


def grouped_case(T, E, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    bias = (0.1 * torch.randn(E, generator=g)).to(DEVICE)
    return tie_free_logits(T, E, dtype, seed), bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_sigmoid_topk_matches_reference(case, dtype):
    T, E, K, n_group, topk_group, renormalize, scaling = GROUPED_CASES[case]
    logits, bias = grouped_case(T, E, seed=len(case), dtype=dtype)
    ids, weights = torch.full((T, K), -1, device=DEVICE), poisoned(T, K, dtype=torch.float32)
    routing.grouped_sigmoid_topk_into(logits, bias, K, n_group, topk_group, renormalize, scaling, ids, weights)
    expected = reference.grouped_sigmoid_topk_reference(logits, bias, K, n_group, topk_group, renormalize, scaling)
    assert torch.equal(ids, expected[0])
    torch.testing.assert_close(weights, expected[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["DeepSeek-V3", "groups of 15", "one group"])
def test_grouped_sigmoid_topk_reference_matches_transformers(case):
    T, E, K, n_group, topk_group, renormalize, scaling = GROUPED_CASES[case]
    config = DeepseekV3Config(
        hidden_size=E, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=renormalize, routed_scaling_factor=scaling,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    logits, bias = grouped_case(T, E, seed=1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))  # hidden = logits: the router's linear is the identity
        router.e_score_correction_bias.copy_(bias.cpu())
        _, hf_weights, hf_ids = router(logits.cpu())
    ids, weights = reference.grouped_sigmoid_topk_reference(
        logits.cpu(), bias.cpu(), K, n_group, topk_group, renormalize, scaling
    )
    # transformers leaves the top k unsorted: compare by expert id
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(hf_ids.gather(1, hf_order), ids.gather(1, order))
    torch.testing.assert_close(hf_weights.gather(1, hf_order), weights.gather(1, order))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=9), "top_k"),  # more than the 8 experts of the kept groups
        (dict(n_group=3), "n_group"),  # does not divide E = 16
        (dict(topk_group=5), "topk_group"),
        (dict(bias=torch.zeros(15)), "bias"),
    ],
    ids=["top_k", "n_group", "topk_group", "bias"],
)
def test_grouped_sigmoid_topk_rejects_bad_input(kwargs, message):
    logits, bias = grouped_case(3, 16, seed=0)
    args = dict(logits=logits, bias=bias, top_k=4, n_group=4, topk_group=2, renormalize=True, scaling=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        routing.grouped_sigmoid_topk(**args)


def test_softmax_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        routing.softmax_topk(tie_free_logits(2, 4, torch.float32, 0), 5, True)
    with pytest.raises(ValueError, match="logits dtype"):
        routing.softmax_topk(torch.zeros(2, 4, dtype=torch.float64, device=DEVICE), 2, True)


# ---------------------------------------------------------------------------------------- norm

NORM_CASES = {
    # name: (shape, weight dtype: None = x's dtype)
    "one row": ((1, 64), None),
    "D not a power of two": ((37, 96), None),
    "odd D": ((5, 33), None),
    "3-d input": ((3, 4, 40), None),
    "float32 weight": ((6, 48), torch.float32),  # the output takes weight * x's dtype, float32
}


@pytest.mark.parametrize("scale_in_fp32", [False, True], ids=["llama-order", "gpt-oss-order"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_CASES)
def test_rms_norm_matches_reference(case, dtype, residual, scale_in_fp32):
    shape, weight_dtype = NORM_CASES[case]
    g = torch.Generator().manual_seed(len(case))
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    r = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype).to(DEVICE)
    # scale_in_fp32 rounds once, after the weight, to x's dtype
    D, out_dtype = shape[-1], dtype if scale_in_fp32 else torch.promote_types(dtype, weight.dtype)
    x, r = x.view(-1, D), r.view(-1, D)  # the launcher takes [T, D]; rms_norm reshapes [..., D]
    out = poisoned(x.shape[0], D, dtype=out_dtype)
    wd = weight.cpu().double()
    if residual:
        h = poisoned(x.shape[0], D, dtype=dtype)
        norm.rms_norm_into(x, weight, 1e-6, out, r, h, scale_in_fp32)
        assert not h.isnan().any(), UNWRITTEN
        assert rel_rms(h, x.double() + r.double()) < TOLERANCE[dtype] / 2  # one rounding of an exact sum
        # the statistics are those of the rounded sum, as the unfused add then norm computes them
        expected = reference.rms_norm_reference(h.cpu().double(), wd, 1e-6, scale_in_fp32)
    else:
        norm.rms_norm_into(x, weight, 1e-6, out, scale_in_fp32=scale_in_fp32)
        expected = reference.rms_norm_reference(x.cpu().double(), wd, 1e-6, scale_in_fp32)
    assert out.dtype == out_dtype
    assert not out.isnan().any(), UNWRITTEN
    assert rel_rms(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_references_are_transformers_norms_bit_for_bit(dtype):
    """Mixtral's RMSNorm rounds the normalised rows to the model dtype, then scales them;
    GPT-OSS's scales the float32 rows by its weight, then rounds once. The two orders differ in the
    last bit of about a third of the elements in bfloat16."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(9, 48, generator=g)).to(dtype)
    weight = (1 + 0.3 * torch.randn(48, generator=g)).to(dtype)
    got = {}
    for scale_in_fp32, module in ((False, MixtralRMSNorm(48, 1e-5)), (True, GptOssRMSNorm(48, 1e-5))):
        with torch.no_grad():
            module.weight.copy_(weight)
            expected = module.to(dtype)(x)
        got[scale_in_fp32] = reference.rms_norm_reference(x, weight, 1e-5, scale_in_fp32)
        assert got[scale_in_fp32].dtype == dtype and torch.equal(got[scale_in_fp32], expected)
    assert not torch.equal(got[False], got[True])


def test_rms_norm_public_shapes_and_errors():
    x = torch.randn(2, 3, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    assert norm.rms_norm(x, w, 1e-5).shape == (2, 3, 16)
    r = torch.randn(2, 3, 16, device=DEVICE)
    normed, h = norm.rms_norm(x, w, 1e-5, residual=r)
    expected_normed, expected_h = reference.rms_norm_residual_reference(x, r, w, 1e-5)
    assert torch.equal(h, expected_h)
    torch.testing.assert_close(normed, expected_normed)
    with pytest.raises(ValueError, match="weight"):
        norm.rms_norm(x, torch.ones(15, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        norm.rms_norm(x, w, 1e-5, residual=x[:1])
    with pytest.raises(ValueError, match="residual"):
        norm.rms_norm(x, w, 1e-5, residual=x.half())


# ---------------------------------------------------------------------------------------- configs


def test_block_config_lookup_nearest_m_and_fallback(tmp_path):
    entry = dict(block_m=16, block_n=32, block_k=64, group_m=1, num_warps=4, num_stages=3)
    table = {"1": entry, "64": entry | dict(block_m=64), "1024": entry | dict(block_m=128)}
    name = block_configs.config_file_name(8, 14336, 4096, torch.bfloat16, "Some_GPU")
    assert name == "E=8,N=14336,K=4096,dtype=bfloat16,device=Some_GPU.json"
    (tmp_path / name).write_text(json.dumps({"tuned": True, "source": "test", "configs": table}))
    picks = [
        block_configs.moe_block_config(8, 14336, 4096, torch.bfloat16, m, "Some_GPU", tmp_path)
        for m in (1, 20, 40, 600, 5000)
    ]
    assert [c.block_m for c in picks] == [16, 16, 64, 128, 128]
    # no file for this dtype: the heuristic by M
    fallback = block_configs.moe_block_config(8, 14336, 4096, torch.float16, 1, "Some_GPU", tmp_path)
    assert fallback == block_configs.heuristic_config(1, 8, "Some_GPU")


def test_shipped_example_config_parses_and_is_never_used():
    name = block_configs.config_file_name(8, 14336, 4096, torch.bfloat16, "EXAMPLE_NOT_TUNED")
    tuned, table = block_configs.read_config_file(block_configs.CONFIG_DIR / name)
    assert not tuned and sorted(table) == [1, 16, 256, 4096]
    got = block_configs.moe_block_config(8, 14336, 4096, torch.bfloat16, 16, "EXAMPLE_NOT_TUNED")
    assert got == block_configs.heuristic_config(16, 8, "EXAMPLE_NOT_TUNED")
    for path in block_configs.CONFIG_DIR.glob("*.json"):
        block_configs.read_config_file(path)  # every shipped file parses


def test_block_config_rejects_bad_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"tuned": true, "configs": {"16": {"block_m": 16}}}')
    with pytest.raises(ValueError, match="expected entries"):
        block_configs.read_config_file(path)
    with pytest.raises(ValueError, match="power of two"):
        BlockConfig(block_m=24, block_n=32, block_k=32, group_m=1)


def test_align_block_bound_is_tight_enough():
    # decode: T*K pairs on at most T*K experts, so the static grid is one block per pair
    blocks = moe.align_by_expert(torch.tensor([[3, 5]], device=DEVICE), torch.arange(8, device=DEVICE), 16)
    assert blocks.block_slots.shape[0] == triton.cdiv(2 + 2 * 15, 16) == 2


# ---------------------------------------------------------------------------------------- GPU build

# Compiles each kernel for sm_90 with the ptxas bundled in Triton's wheel, no GPU needed: catches
# what the interpreter lets through (types, constexpr use, layouts) on machines without a GPU.
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moeinf.kernels import moe, norm, routing

def build(kernel, types, constexprs):
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    options = {"num_warps": 4, "num_stages": 3}
    triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)

# (dtype, upcast, dot precision, biases, activation): Mixtral and GPT-OSS in bf16, then the other paths
for dt, upcast, precision, bias, activation in (
    ("bf16", False, None, False, 0), ("bf16", False, None, True, 1),
    ("fp32", False, "ieee", True, 0), ("bf16", True, "ieee", False, 1),
):
    blocks = dict(TOP_K=2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, HAS_BIAS=bias, UPCAST=upcast)
    blocks["DOT_PRECISION"] = precision
    index = dict(pairs_ptr="*i32", block_slots_ptr="*i32", stride_ws="i64", alpha="fp32", limit="fp32")
    gate_up = dict(x_ptr=f"*{dt}", w13_ptr=f"*{dt}", b13_ptr=f"*{dt}", act_ptr=f"*{dt}", **index)
    down = dict(act_ptr=f"*{dt}", w2_ptr=f"*{dt}", b2_ptr=f"*{dt}", weights_ptr="*fp32", y_ptr="*fp32", **index)
    # without biases the launchers pass None for the bias pointers, which Triton makes constexprs
    build(moe._gate_up_act_kernel, gate_up, dict(blocks, ACTIVATION=activation, **({} if bias else dict(b13_ptr=None))))
    build(moe._down_weighted_kernel, down, dict(blocks, **({} if bias else dict(b2_ptr=None))))
build(moe._combine_kernel, dict(y_ptr="*fp32", out_ptr="*bf16"), dict(TOP_K=8, BLOCK_T=16, BLOCK_D=256))
pointers = dict(x_ptr="*bf16", residual_ptr="*bf16", weight_ptr="*bf16", out_ptr="*bf16", h_ptr="*bf16", eps="fp32")
for scale_in_fp32 in (False, True):
    norm_blocks = dict(HAS_RESIDUAL=True, SCALE_IN_FP32=scale_in_fp32, BLOCK_T=1, BLOCK_D=4096)
    build(norm._rms_norm_kernel, pointers, norm_blocks)
outputs = dict(ids_ptr="*i64", weights_ptr="*fp32")
build(routing._softmax_topk_kernel, dict(logits_ptr="*bf16", **outputs),
      dict(TOP_K=2, RENORMALIZE=True, BLOCK_T=32, BLOCK_E=8, BLOCK_K=2))
build(routing._grouped_sigmoid_topk_kernel, dict(logits_ptr="*fp32", bias_ptr="*fp32", scaling="fp32", **outputs),
      dict(TOP_K=8, N_GROUP=8, TOPK_GROUP=4, RENORMALIZE=True, BLOCK_T=16, BLOCK_E=256, BLOCK_G=8, BLOCK_K=8))
"""


def test_kernels_compile_for_hopper(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
