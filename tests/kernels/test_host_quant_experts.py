"""The quantized host expert kernels against quantized_moe_experts_reference (the float32 reference on
the dequantized experts): int8, int4 and grouped int8 symmetric and asymmetric with float16 and
bfloat16 scales,
group counts odd and even, 1 to 32 tokens, top-2 and top-8, both activations; weights read out of
store-record views in any slot order to the same bits, and from second buffers (the host tier) beside
the slots to the same bits; act-order input orders; nothing read from a slot no routed expert sits
in; bad inputs refused.

Tolerance: TOLERANCE[float32] (1e-5 relative RMS). Kernel and reference multiply the same weights
(int4's and grouped int8's are exact in float32; int8's kernel takes q * x and the row's scale once where the reference
rounds q * scale first: one rounding of 2^-24 apart) and sum float32 products in other orders (16
lanes and a fixed tree here, torch's matmul there): a few 2^-24 roundings per element, about
sqrt(K) of them at most, ~1e-6 at these shapes. A wrong nibble, group or scale costs ~1e-2 or more.
"""

import functools
import os
import subprocess
import sys

import pytest
import torch

from moeinf.kernels import host_quant_experts
from moeinf.kernels.expert_activation import ExpertActivation
from moeinf.kernels.host_experts import SecondBuffers
from moeinf.kernels.host_quant_experts import host_quant_moe_experts
from moeinf.kernels.quantize import QuantizedMatrix, dequantize, quantize, quantized_moe_experts_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=2.0)
FORMATS = {  # name: (hidden D, expert ffn F, quantize options); groups of w13 and w2 in the comments
    "int8": (256, 192, dict(format="int8")),
    "int8-odd": (37, 23, dict(format="int8")),  # rows and inputs no multiple of 4 or 16
    "int4-g32-sym-fp16": (224, 96, dict(format="int4", group_size=32)),  # 7 and 3 groups
    "int4-g32-asym-bf16": (256, 192, dict(format="int4", group_size=32, symmetric=False, scale_dtype=torch.bfloat16)),
    "int4-g64-sym-bf16": (256, 192, dict(format="int4", group_size=64, scale_dtype=torch.bfloat16)),  # 4 and 3
    "int4-g64-asym-fp16": (320, 64, dict(format="int4", group_size=64, symmetric=False)),  # 5 and 1
    "int4-g128-sym-fp16": (384, 128, dict(format="int4", group_size=128)),  # 3 and 1
    "int4-row-asym-fp16": (160, 96, dict(format="int4", group_size=None, symmetric=False)),  # G = K: 1 and 1
    "int4-g128-asym-bf16": (
        256,
        384,
        dict(format="int4", group_size=128, symmetric=False, scale_dtype=torch.bfloat16),
    ),  # fmt: skip  # 2 and 3
    "int8-g32-sym-fp16": (224, 96, dict(format="int8", group_size=32)),  # 7 and 3 groups
    "int8-g64-asym-bf16": (
        256,
        192,
        dict(format="int8", group_size=64, symmetric=False, scale_dtype=torch.bfloat16),
    ),  # fmt: skip  # 4 and 3
    "int8-g128-sym-bf16": (384, 128, dict(format="int8", group_size=128, scale_dtype=torch.bfloat16)),  # 3 and 1
    "int8-row-asym-fp16": (160, 96, dict(format="int8", group_size=None, symmetric=False)),  # G = K: 1 and 1
}


def poison(m: QuantizedMatrix, unused: torch.Tensor) -> QuantizedMatrix:
    """m with NaN scales in the unused slots: a kernel reading one returns NaN."""
    scale = m.scale.clone()
    scale[unused] = float("nan")
    return QuantizedMatrix(m.format, m.q, scale, m.zero, m.group_size)


@functools.cache
def experts(name, E=10, S=12):
    """E experts of format `name` in S > E slots (expert e in slot slots[e]), quantized; the S - E free
    slots' scales NaN. Made once per format: the tests vary the tokens and routing."""
    D, F, options = FORMATS[name]
    g = torch.Generator().manual_seed(len(name))
    w13 = 2 * torch.randn(S, 2 * F, D, generator=g) / D**0.5
    w2 = torch.randn(S, D, F, generator=g) / F**0.5
    slots = torch.randperm(S, generator=g)[:E]  # [E]
    unused = torch.ones(S, dtype=torch.bool)
    unused[slots] = False
    return poison(quantize(w13, **options), unused), poison(quantize(w2, **options), unused), slots


def make_case(name, T, K, seed=0):
    """T tokens routed to K of the format's experts each (random, distinct), with random weights."""
    w13, w2, slots = experts(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, FORMATS[name][0], generator=g)
    ids = torch.stack([torch.randperm(slots.shape[0], generator=g)[:K] for _ in range(T)])  # [T, K]
    weights = torch.rand(T, K, generator=g)
    return x, ids, weights, w13, w2, slots


def check(name, T, K, seed=0, activation=None):
    x, ids, weights, w13, w2, slots = make_case(name, T, K, seed=seed)
    extras = {} if activation is None else dict(activation=activation)
    got = host_quant_moe_experts(x, ids, weights, w13, w2, slots, **extras)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert not got.isnan().any(), "a free slot was read"
    expected = quantized_moe_experts_reference(x, ids, weights, w13, w2, slots, **extras)
    assert rel_rms(got, expected) < TOLERANCE[torch.float32]
    return got, expected


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("T", [1, 4, 16, 32])
@pytest.mark.parametrize("K", [2, 8])
def test_matches_the_reference(name, T, K):
    check(name, T, K, seed=T + K)


@pytest.mark.parametrize("name", ["int8-odd", "int4-g32-asym-bf16", "int8-g64-asym-bf16"])
@pytest.mark.parametrize("T", [2, 3, 5, 7])
def test_token_counts_that_leave_a_partial_tile(name, T):
    """Every token routed to the same experts: tiles of 4 tokens with 1 to 3 left over."""
    x, ids, weights, w13, w2, slots = make_case(name, T, 2, seed=T)
    ids = ids[:1].expand(T, 2).contiguous()
    got = host_quant_moe_experts(x, ids, weights, w13, w2, slots)
    expected = quantized_moe_experts_reference(x, ids, weights, w13, w2, slots)
    assert rel_rms(got, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["int8", "int4-g64-asym-fp16", "int8-g32-sym-fp16"])
def test_the_clamped_activation(name):
    got, expected = check(name, 5, 2, activation=CLAMPED)
    x, ids, weights, w13, w2, slots = make_case(name, 5, 2)
    assert rel_rms(quantized_moe_experts_reference(x, ids, weights, w13, w2, slots), expected) > 0.05  # clamps bind


WIDENED = """
import sys, torch
from moeinf.kernels import host_quant_experts
from tests.kernels.test_host_quant_experts import make_case
assert not host_quant_experts.LOOKUP
outs = [host_quant_experts.host_quant_moe_experts(*make_case(name, 6, 8)) for name in sys.argv[2:]]
torch.save(outs, sys.argv[1])
"""


def test_the_table_lookup_and_the_widening_agree(tmp_path):
    """int4 codes looked up in a group's 16 values (AVX-512) or widened and multiplied (elsewhere,
    compiled in a process that targets haswell): the same dequantized weights, exactly, so the same
    bits out."""
    names = ["int4-g32-asym-bf16", "int4-g128-sym-fp16"]
    cache = tmp_path / "numba"  # the haswell kernels compile afresh, and leave no cache behind
    env = os.environ | {"NUMBA_CPU_NAME": "haswell", "NUMBA_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", WIDENED, str(tmp_path / "widened.pt"), *names],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name, widened in zip(names, torch.load(tmp_path / "widened.pt")):
        x, ids, weights, w13, w2, slots = make_case(name, 6, 8)
        assert torch.equal(host_quant_moe_experts(x, ids, weights, w13, w2, slots), widened), name
        expected = quantized_moe_experts_reference(x, ids, weights, w13, w2, slots)
        assert rel_rms(widened, expected) < TOLERANCE[torch.float32]


def record_views(m: QuantizedMatrix, order: torch.Tensor, pad: int = 24):
    """m [S, N, K]'s arrays laid out as a store record per slot: q, scale, zero back to back in one
    byte buffer (each at an offset aligned to 8 bytes, at least `pad` bytes apart), slot s's
    arrays in record order[s]; returns the strided views (a QuantizedMatrix) into it."""
    arrays = [t for t in (m.q, m.scale, m.zero) if t is not None]
    S = m.q.shape[0]
    offsets, end = [], 0
    for t in arrays:
        offsets.append(end)
        end = (end + t[0].numel() * t.element_size() + pad + 7) // 8 * 8
    R = end
    records = torch.zeros(S * R, dtype=torch.uint8)
    views = []
    for t, offset in zip(arrays, offsets):
        size = t.element_size()
        flat = records.view(t.dtype)
        view = flat.as_strided(t.shape, (R // size, *t[0].stride()), offset // size)
        view[order] = t
        views.append(view)
    zero = views[2] if m.zero is not None else None
    return QuantizedMatrix(m.format, views[0], views[1], zero, m.group_size)


@pytest.mark.parametrize("name", ["int8-odd", "int4-g32-sym-fp16", "int4-g128-asym-bf16", "int8-g64-asym-bf16"])
def test_record_views_in_any_slot_order_give_the_same_bits(name):
    x, ids, weights, w13, w2, slots = make_case(name, 6, 8)
    resident = host_quant_moe_experts(x, ids, weights, w13, w2, slots)
    order = torch.randperm(w13.q.shape[0], generator=torch.Generator().manual_seed(5))  # slot s in record order[s]
    pooled = host_quant_moe_experts(x, ids, weights, record_views(w13, order), record_views(w2, order), order[slots])
    assert torch.equal(pooled, resident)


@pytest.mark.parametrize("name", ["int8-odd", "int4-g32-asym-bf16", "int8-row-asym-fp16"])
def test_experts_in_second_buffers_give_the_same_bits(name):
    """Some routed experts read from a second buffer (the host tier's records, in another order):
    computed exactly as from their slots."""
    x, ids, weights, w13, w2, slots = make_case(name, 5, 4)
    resident = host_quant_moe_experts(x, ids, weights, w13, w2, slots)
    order = torch.randperm(w13.q.shape[0], generator=torch.Generator().manual_seed(7))
    second_slots = torch.full_like(slots, -1)
    second_slots[::2] = order[slots[::2]]  # every other expert read from the second buffer
    slots_left = slots.clone()
    slots_left[::2] = -1  # not in a slot: a read from the first buffer would fault the range check
    host = SecondBuffers(second_slots, record_views(w13, order), record_views(w2, order))
    mixed = host_quant_moe_experts(x, ids, weights, w13, w2, slots_left, second=host)
    assert torch.equal(mixed, resident)


def random_input_orders(S: int, D: int, seed: int) -> torch.Tensor:
    """perm [S, D] int32: a random input order per slot, as if each slot's w13 were the packed
    W[:, perm] of act-order weights."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(D, generator=g) for _ in range(S)]).to(torch.int32)


@pytest.mark.parametrize("name", ["int8", "int4-g64-asym-fp16", "int8-g128-sym-bf16"])
def test_input_orders_of_act_order_weights(name):
    x, ids, weights, w13, w2, slots = make_case(name, 6, 4)
    perm = random_input_orders(w13.shape[0], w13.shape[2], seed=3)
    got = host_quant_moe_experts(x, ids, weights, w13, w2, slots, input_perm=perm)
    expected = quantized_moe_experts_reference(x, ids, weights, w13, w2, slots, input_perm=perm)
    assert rel_rms(got, expected) < TOLERANCE[torch.float32]
    # the order matters: without it the result is another one
    assert rel_rms(host_quant_moe_experts(x, ids, weights, w13, w2, slots), expected) > 0.1
    # and the reference puts w13's columns back: x[:, perm] against the packed columns
    e = int(ids[0, 0])
    packed = dequantize(w13[int(slots[e])])  # [2F, D]
    direct = x[:1, perm[int(slots[e])].long()] @ packed.T
    unpermuted = torch.empty_like(packed)
    unpermuted[:, perm[int(slots[e])].long()] = packed
    assert torch.allclose(direct, x[:1] @ unpermuted.T, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_with_what_was_found():
    x, ids, weights, w13, w2, slots = make_case("int4-g32-sym-fp16", 2, 2)
    with pytest.raises(ValueError, match=r"expected x float32 \[T, D\], found torch.bfloat16"):
        host_quant_moe_experts(x.bfloat16(), ids, weights, w13, w2, slots)
    with pytest.raises(ValueError, match=r"expected topk_ids and topk_weights \[2, K\]"):
        host_quant_moe_experts(x, ids, weights[:, :1], w13, w2, slots)
    narrow = QuantizedMatrix("int4", w13.q[:, :, :96].contiguous(), w13.scale[:, :, :6].contiguous(), None, 32)
    with pytest.raises(ValueError, match=r"w13: expected \[S, 192, 224\], found \[12, 192, 192\]"):
        host_quant_moe_experts(x, ids, weights, narrow, w2, slots)
    with pytest.raises(ValueError, match=r"expected routed experts in 0..9 in slots 0..11, found experts 10..10"):
        host_quant_moe_experts(x, torch.full_like(ids, 10), weights, w13, w2, slots)
    with pytest.raises(ValueError, match=r"in slots 0..11, found experts .* in slots .*\.\.12"):
        host_quant_moe_experts(x, ids, weights, w13, w2, torch.full_like(slots, 12))
    strided = QuantizedMatrix("int4", w13.q.transpose(0, 1).contiguous().transpose(0, 1), w13.scale, None, 32)
    with pytest.raises(ValueError, match=r"w13 q: expected \[S, 192, 112\] with each slot's block contiguous"):
        host_quant_moe_experts(x, ids, weights, strided, w2, slots)


def test_applies_to_decode_sized_float32_steps():
    x = torch.zeros(host_quant_experts.MAX_TOKENS, 8)
    assert host_quant_experts.applies(x) and host_quant_experts.applies(x[:1])
    assert not host_quant_experts.applies(torch.cat([x, x[:1]]))
    assert not host_quant_experts.applies(x.bfloat16())


def test_a_matrix_views_are_built_once_and_dropped_with_it():
    """The kernels' views of a matrix are kept while it lives (a decode step passes the same
    matrices every layer) and dropped when it dies, so a later matrix at the same id gets its own."""
    x, ids, weights, w13, w2, slots = make_case("int4-g32-sym-fp16", 3, 2)
    w13, w2 = (QuantizedMatrix(m.format, m.q.clone(), m.scale, m.zero, m.group_size) for m in (w13, w2))
    D, F = FORMATS["int4-g32-sym-fp16"][:2]
    expected = host_quant_moe_experts(x, ids, weights, w13, w2, slots)
    views = host_quant_experts._VIEWS[(id(w13), 2 * F, D)]
    assert torch.equal(host_quant_moe_experts(x, ids, weights, w13, w2, slots), expected)
    assert host_quant_experts._VIEWS[(id(w13), 2 * F, D)] is views
    key = (id(w13), 2 * F, D)
    del w13
    assert key not in host_quant_experts._VIEWS
