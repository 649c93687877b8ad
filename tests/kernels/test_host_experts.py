"""The host expert kernels against moe_experts_reference: float32 within its tolerance, bfloat16 with
the reference's roundings (bit for bit but where a dot product's sum order tips a rounding), biases,
both activations, weights read straight out of store-record slot views, and nothing read from a slot
no routed expert sits in."""

import pytest
import torch

from moeinf.kernels import host_experts
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.host_experts import host_moe_experts
from moeinf.kernels.ops import AUTO, Kernels
from moeinf.kernels.reference import moe_experts_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms
from moeinf.loaders.expert_record import RecordLayout

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=2.0)  # binds at the scale below
# hidden D and expert ffn F: the default model's shape, and one whose rows are no multiple of 4
SHAPES = {"4-aligned": (64, 48), "odd": (37, 23)}


def make_case(D, F, T, dtype, E=6, K=2, S=9, seed=0, biases=False, weights_dtype=torch.float32):
    """Experts in S > E slots (expert e in slot slots[e]); the slots no expert holds are NaN."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.full((S, 2 * F, D), float("nan"))
    w2 = torch.full((S, D, F), float("nan"))
    slots = torch.randperm(S, generator=g)[:E]  # [E]
    w13[slots] = 2 * torch.randn(E, 2 * F, D, generator=g) / D**0.5
    w2[slots] = torch.randn(E, D, F, generator=g) / F**0.5
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    weights = torch.rand(T, K, generator=g).to(weights_dtype)
    extras = {}
    if biases:
        b13, b2 = torch.full((S, 2 * F), float("nan")), torch.full((S, D), float("nan"))
        b13[slots], b2[slots] = torch.randn(E, 2 * F, generator=g), torch.randn(E, D, generator=g)
        extras = dict(b13=b13.to(dtype), b2=b2.to(dtype))
    return x.to(dtype), ids, weights, w13.to(dtype), w2.to(dtype), slots, extras


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 4, 5, 16, 32])
def test_float32_matches_the_reference(shape, T):
    x, ids, weights, w13, w2, slots, _ = make_case(*SHAPES[shape], T, torch.float32, seed=T)
    got = host_moe_experts(x, ids, weights, w13, w2, slots)
    assert not got.isnan().any(), "a NaN slot was read"
    assert rel_rms(got, moe_experts_reference(x, ids, weights, w13, w2, slots)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("activation", [SILU, CLAMPED], ids=["silu", "clamped"])
@pytest.mark.parametrize("biases", [False, True], ids=["plain", "biases"])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
def test_bfloat16_rounds_where_the_reference_rounds(activation, biases, weights_dtype):
    """Each GEMM output, bias add, activation step and model-dtype routing product rounded to
    bfloat16 as the reference's tensors are: its output, bit for bit, on almost every element."""
    case = make_case(64, 48, 16, torch.bfloat16, seed=3, biases=biases, weights_dtype=weights_dtype)
    x, ids, weights, w13, w2, slots, extras = case
    got = host_moe_experts(x, ids, weights, w13, w2, slots, activation=activation, **extras)
    expected = moe_experts_reference(x, ids, weights, w13, w2, slots, activation=activation, **extras)
    assert (got == expected).float().mean() > 0.99
    assert rel_rms(got, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_biases_and_the_clamped_activation(dtype):
    x, ids, weights, w13, w2, slots, extras = make_case(*SHAPES["odd"], 5, dtype, K=3, biases=True)
    got = host_moe_experts(x, ids, weights, w13, w2, slots, activation=CLAMPED, **extras)
    expected = moe_experts_reference(x, ids, weights, w13, w2, slots, activation=CLAMPED, **extras)
    assert rel_rms(got, expected) < TOLERANCE[dtype]
    assert rel_rms(moe_experts_reference(x, ids, weights, w13, w2, slots, **extras), expected) > 0.05  # clamps bind


def record_views(w13, w2, b13=None, b2=None, order=None):
    """The experts of w13 [S, 2F, D] and w2 [S, D, F] (and b13, b2) laid out as the expert pool holds
    them: one padded store record per slot, the slots in `order`, and strided views into them."""
    S, F2, D = w13.shape
    layout = RecordLayout.of(D, F2 // 2, w13.dtype, biases=b13 is not None)
    R, itemsize = layout.record_nbytes, w13.element_size()
    records = torch.zeros((S, R), dtype=torch.uint8)
    flat = records.view(-1).view(w13.dtype)
    views = [
        flat.as_strided((S, F2, D), (R // itemsize, D, 1)),
        flat.as_strided((S, D, F2 // 2), (R // itemsize, F2 // 2, 1), layout.field("w2").offset // itemsize),
    ]
    if b13 is not None:
        views += [
            flat.as_strided((S, F2), (R // itemsize, 1), layout.field("b13").offset // itemsize),
            flat.as_strided((S, D), (R // itemsize, 1), layout.field("b2").offset // itemsize),
        ]
    for view, source in zip(views, (w13, w2, b13, b2)):
        view.copy_(source[order])
    return views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_slots_and_any_slot_order_give_the_same_bits(dtype):
    """Resident tensors and record views of the same experts, in another slot order: the same output
    to the last bit, as an offloaded run must equal the resident one."""
    x, ids, weights, w13, w2, slots, extras = make_case(64, 48, 7, dtype, biases=True)
    resident = host_moe_experts(x, ids, weights, w13, w2, slots, activation=CLAMPED, **extras)
    order = torch.randperm(w13.shape[0], generator=torch.Generator().manual_seed(5))  # record i holds slot order[i]
    r13, r2, rb13, rb2 = record_views(w13, w2, extras["b13"], extras["b2"], order)
    moved = torch.argsort(order)[slots]  # [E] where each expert's record is now
    pooled = host_moe_experts(x, ids, weights, r13, r2, moved, b13=rb13, b2=rb2, activation=CLAMPED)
    assert torch.equal(pooled, resident)


def test_the_slot_views_are_built_once_and_dropped_with_their_tensors():
    """The views of a slot buffer are kept while its tensors live (a decode step passes every layer
    the same buffers), follow their contents, and go with the first of them to die."""
    x, ids, weights, w13, w2, slots, extras = make_case(64, 48, 3, torch.float32, biases=True)
    expected = host_moe_experts(x, ids, weights, w13, w2, slots, **extras)
    key = (id(w13), id(w2), id(extras["b13"]), id(extras["b2"]), w13.shape[0], 96, 64, 48)
    views = host_experts._BUFFERS[key]
    assert torch.equal(host_moe_experts(x, ids, weights, w13, w2, slots, **extras), expected)
    assert host_experts._BUFFERS[key] is views
    w2[slots] *= 2  # new contents in the same slots (as a fetch writes them): seen through the views
    extras["b2"][slots] *= 2
    assert torch.equal(host_moe_experts(x, ids, weights, w13, w2, slots, **extras), 2 * expected)
    del w2
    assert key not in host_experts._BUFFERS


def test_bad_inputs_are_refused_with_what_was_found():
    x, ids, weights, w13, w2, slots, _ = make_case(64, 48, 2, torch.float32)
    with pytest.raises(ValueError, match="expected x and weights all float32 or all bfloat16"):
        host_moe_experts(x.bfloat16(), ids, weights, w13, w2, slots)
    with pytest.raises(ValueError, match=r"w13: expected \[S, 96, 64\] with each slot's block contiguous"):
        host_moe_experts(x, ids, weights, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, slots)
    with pytest.raises(ValueError, match=r"expected topk_ids and topk_weights \[2, K\]"):
        host_moe_experts(x, ids, weights[:, :1], w13, w2, slots)


def test_the_default_cpu_kernels_run_them_for_decode_sized_steps():
    x, ids, weights, w13, w2, slots, _ = make_case(64, 48, host_experts.MAX_TOKENS, torch.float32)
    assert host_experts.applies(x, w13, w2) and host_experts.applies(x[:1], w13, w2)
    assert not host_experts.applies(torch.cat([x, x[:1]]), w13, w2)  # prefill-sized: the grouped matmuls
    assert not host_experts.applies(x.half(), w13.half(), w2.half())
    assert not host_experts.applies(x, w13, w2, torch.zeros(9, 96), torch.zeros(9, 64, 2)[:, :, 0])  # a strided bias
    assert torch.equal(
        AUTO.moe_experts(x, ids, weights, w13, w2, slots), host_moe_experts(x, ids, weights, w13, w2, slots)
    )
    # the torch kernels stay the references: the baseline the host kernels are measured against
    torch_path = Kernels("torch").moe_experts(x[:1], ids[:1], weights[:1], w13, w2, slots)
    assert torch.equal(torch_path, moe_experts_reference(x[:1], ids[:1], weights[:1], w13, w2, slots))
