"""fused_quant_moe (kernels/quant_moe.py) against quantized_moe_experts_reference: int8, int4 and
grouped int8 symmetric and asymmetric with float16 and bfloat16 scales, groups of 32, 64 and G = K, w13 and w2 in different
formats, x in float32, float16 and bfloat16, both activations, host-share rows; the weights read
out of strided views into one store record per slot; bad inputs refused.

On a machine without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on
CPU tensors, at small shapes. The record buffer is filled with 0xFF bytes before the experts are
laid in, so every scale outside a resident expert's arrays (free slots, the gaps between arrays)
is NaN: reading a wrong slot, offset or stride shows as NaN in the output. Outputs start as NaN
too, so an element no program writes shows up.

Tolerance: TOLERANCE of x's dtype. float32: kernel and reference multiply the same weights (int4's
are exact in float32; int8's kernel applies the row's scale after the sum where the reference
rounds q * scale first) and sum in other orders, a few 2^-24 roundings per element. 16-bit x: the
kernel rounds act and the output to x's dtype where the reference keeps float32 (and int4's and
grouped int8's dequantized weights to x's dtype).
"""

import pytest
import torch

from moeinf.kernels import block_configs, quant_moe
from moeinf.kernels.block_configs import BlockConfig
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.moe import HOST_SLOT
from moeinf.kernels.quant_moe import fused_quant_moe, int4_block_k
from moeinf.kernels.quantize import QuantizedMatrix, quantize, quantized_moe_experts_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms

DEVICE = torch.device("cpu" if block_configs.interpreting() or not torch.cuda.is_available() else "cuda")
CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=2.0)  # binds at the weights' scale below
GATE_UP_SCALE = 2.0  # std of the gate and up pre-activations, about
UNWRITTEN = "NaN in the output: an element was never written, or a wrong slot, offset or stride was read"
ALIGN = 64  # bytes: where each array of a record starts

INT8 = dict(format="int8")
G32_SYM_FP16 = dict(format="int4", group_size=32)
G32_ASYM_BF16 = dict(format="int4", group_size=32, symmetric=False, scale_dtype=torch.bfloat16)
ROW_ASYM_FP16 = dict(format="int4", group_size=None, symmetric=False)  # G = K: one group per row
G64_SYM_BF16 = dict(format="int4", group_size=64, scale_dtype=torch.bfloat16)
I8_G32_SYM_FP16 = dict(format="int8", group_size=32)  # grouped int8 (16-bit scales per group)
I8_G32_ASYM_BF16 = dict(format="int8", group_size=32, symmetric=False, scale_dtype=torch.bfloat16)
I8_ROW_ASYM_FP16 = dict(format="int8", group_size=None, symmetric=False)  # G = K
I8_G64_ASYM_FP16 = dict(format="int8", group_size=64, symmetric=False)

CASES = {
    # name: (T, D, F, w13 format, w2 format, x dtype, activation); E = 7 experts, 5 resident, top-2
    "int8, float32": (9, 72, 40, INT8, INT8, torch.float32, SILU),  # D, F no multiple of the blocks
    "int8, bfloat16, clamped": (7, 48, 24, INT8, INT8, torch.bfloat16, CLAMPED),
    "int4 g32 sym fp16, float32": (9, 96, 64, G32_SYM_FP16, G32_SYM_FP16, torch.float32, SILU),  # 3 and 2 groups
    "int4 g32 asym bf16, bfloat16": (6, 64, 96, G32_ASYM_BF16, G32_ASYM_BF16, torch.bfloat16, SILU),
    "int4 G=K asym fp16, float16, clamped": (5, 96, 64, ROW_ASYM_FP16, ROW_ASYM_FP16, torch.float16, CLAMPED),
    "int4 g64 sym bf16, float32": (4, 128, 64, G64_SYM_BF16, G64_SYM_BF16, torch.float32, SILU),
    "int8 w13, int4 w2, bfloat16, clamped": (8, 64, 64, INT8, G32_ASYM_BF16, torch.bfloat16, CLAMPED),
    "int4 w13, int8 w2, float32": (6, 96, 40, ROW_ASYM_FP16, INT8, torch.float32, SILU),
    "int8 g32 sym fp16, float32": (9, 96, 64, I8_G32_SYM_FP16, I8_G32_SYM_FP16, torch.float32, SILU),  # 3 and 2
    "int8 g32 asym bf16, bfloat16, clamped": (6, 64, 96, I8_G32_ASYM_BF16, I8_G32_ASYM_BF16, torch.bfloat16, CLAMPED),
    "int8 G=K asym fp16, float16": (5, 96, 64, I8_ROW_ASYM_FP16, I8_ROW_ASYM_FP16, torch.float16, SILU),
    "int8 g64 asym w13, int4 w2, float32": (6, 128, 64, I8_G64_ASYM_FP16, G32_SYM_FP16, torch.float32, SILU),
}
E, RESIDENT, TOP_K = 7, 5, 2


# ---------------------------------------------------------------------------------------- experts


def record_views(
    matrices: list[QuantizedMatrix], records_of: torch.Tensor, S: int, extra: tuple = ()
) -> tuple[list[QuantizedMatrix], list[torch.Tensor]]:
    """The arrays of the matrices (each a stack [A, ...] of A experts), then the extra arrays
    ([A, ...] each), laid out as one store record per slot in a uint8 buffer [S, R] filled with
    0xFF: q, scale, zero of each matrix in turn, then the extras, each at an ALIGN-byte offset with
    a gap after it, expert a's arrays in record records_of[a]. Returns the strided views [S, ...]
    into the buffer: the matrices as QuantizedMatrix stacks of S slots, and the extras."""
    arrays = [t for m in matrices for t in (m.q, m.scale, m.zero) if t is not None] + list(extra)
    offsets, end = [], 0
    for t in arrays:
        offsets.append(end)
        end = (end + t[0].numel() * t.element_size() + 2 * ALIGN - 1) // ALIGN * ALIGN  # >= ALIGN bytes of gap
    R = end
    records = torch.full((S, R), 0xFF, dtype=torch.uint8, device=DEVICE)  # scales outside the arrays: NaN
    laid = []
    for t, offset in zip(arrays, offsets):
        size = t.element_size()  # a view of this dtype needs the offset and R to be multiples of it
        inner = t[0].contiguous().stride()
        view = records.view(-1).view(t.dtype).as_strided((S, *t.shape[1:]), (R // size, *inner), offset // size)
        view[records_of] = t.to(DEVICE)
        laid.append(view)
    views = iter(laid)
    out = []
    for m in matrices:
        q, scale = next(views), next(views)
        zero = next(views) if m.zero is not None else None
        out.append(QuantizedMatrix(m.format, q, scale, zero, m.group_size))
    return out, list(views)


def make_case(name: str, seed: int = 0, act_order: bool = False):
    """(x, ids, weights, w13, w2, slots) of a case: E experts of which RESIDENT have slots (the others
    -1, never routed), quantized and laid into S = RESIDENT + 3 records in a permuted order; T tokens
    routed to TOP_K distinct resident experts each. Also returns the compact stacks (w13, w2) and
    their slot table, for the same experts without records. act_order: the records also hold an
    input_perm int32 [D] per expert (each its own), returned as a third element: its view [S, D]."""
    T, D, F, f13, f2, dtype, _ = CASES[name]
    g = torch.Generator().manual_seed(seed + len(name))
    S = RESIDENT + 3
    w13 = quantize(GATE_UP_SCALE * torch.randn(RESIDENT, 2 * F, D, generator=g) / D**0.5, **f13)
    w2 = quantize(torch.randn(RESIDENT, D, F, generator=g) / F**0.5, **f2)
    resident = torch.randperm(E, generator=g)[:RESIDENT]  # [RESIDENT] expert ids with a slot
    records_of = torch.randperm(S, generator=g)[:RESIDENT]  # [RESIDENT] record of each resident expert
    slots = torch.full((E,), -1, dtype=torch.int64)
    slots[resident] = records_of
    compact_slots = torch.full((E,), -1, dtype=torch.int64)
    compact_slots[resident] = torch.arange(RESIDENT)
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.stack([resident[torch.randperm(RESIDENT, generator=g)[:TOP_K]] for _ in range(T)])  # [T, K]
    weights = torch.softmax(torch.randn(T, TOP_K, generator=g), dim=-1)
    perms = torch.stack([torch.randperm(D, generator=g) for _ in range(RESIDENT)]).to(torch.int32)  # [RESIDENT, D]
    (v13, v2), extras = record_views([w13, w2], records_of, S, extra=(perms,) if act_order else ())
    tensors = [t.to(DEVICE) for t in (x, ids, weights)]
    compact = [w13, w2] if DEVICE.type == "cpu" else [on_device(m) for m in (w13, w2)]
    inputs, compact = (*tensors, v13, v2, slots.to(DEVICE)), (*compact, compact_slots.to(DEVICE))
    return (inputs, compact, extras[0]) if act_order else (inputs, compact)


def on_device(m: QuantizedMatrix) -> QuantizedMatrix:
    zero = None if m.zero is None else m.zero.to(DEVICE)
    return QuantizedMatrix(m.format, m.q.to(DEVICE), m.scale.to(DEVICE), zero, m.group_size)


def poisoned(T: int, D: int, dtype) -> torch.Tensor:
    return torch.full((T, D), float("nan"), dtype=dtype, device=DEVICE)


def expected(x, ids, weights, w13, w2, slots, activation=SILU) -> torch.Tensor:
    return quantized_moe_experts_reference(x, ids, weights, w13, w2, slots, activation=activation)


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES)
def test_matches_the_reference(case):
    (x, ids, weights, w13, w2, slots), _ = make_case(case)
    activation = CASES[case][6]
    T, D = x.shape
    got = fused_quant_moe(x, ids, weights, w13, w2, slots, activation=activation, out=poisoned(T, D, x.dtype))
    assert got.dtype == x.dtype and got.shape == (T, D)
    assert not got.isnan().any(), UNWRITTEN
    reference = expected(x, ids, weights, w13, w2, slots, activation)
    assert rel_rms(got, reference) < TOLERANCE[x.dtype]
    if activation is not SILU:  # the clamps bind: the clamped activation is what was checked
        assert rel_rms(expected(x, ids, weights, w13, w2, slots), reference) > 0.05


def test_record_views_and_compact_stacks_give_the_same_bits(monkeypatch):
    """The same experts read out of the records (permuted slots, strided views) and out of compact
    stacks: the same bits. The block config is looked up under the pair's format key."""
    keys = []

    def lookup(*args, format=None, **kwargs):
        keys.append(format)
        return block_configs.moe_block_config(*args, format=format, **kwargs)

    monkeypatch.setattr(quant_moe, "moe_block_config", lookup)
    case = "int8 w13, int4 w2, bfloat16, clamped"
    (x, ids, weights, w13, w2, slots), (c13, c2, compact_slots) = make_case(case, seed=3)
    pooled = fused_quant_moe(x, ids, weights, w13, w2, slots, activation=CLAMPED)
    compact = fused_quant_moe(x, ids, weights, c13, c2, compact_slots, activation=CLAMPED)
    assert torch.equal(pooled, compact)
    assert keys == ["int8_int4", "int8_int4"]
    assert w13.q.stride(0) == w13.scale.stride(0) * 4 == w2.scale.stride(0) * 2  # one record stride, in bytes


HOST_CASES = ["int4 g32 asym bf16, bfloat16", "int4 w13, int8 w2, float32", "int8 G=K asym fp16, float16"]


@pytest.mark.parametrize("case", HOST_CASES)
def test_host_share_rows_add_nothing(case):
    """Experts whose slot is HOST_SLOT: with host_share their pairs add zero (the host computes them);
    token 0's experts are all on the host, so its row is exactly 0."""
    (x, ids, weights, w13, w2, slots), _ = make_case(case, seed=1)
    T, D = x.shape
    on_host = ids[0].unique()  # [K] token 0's experts
    host_slots = slots.clone()
    host_slots[on_host] = HOST_SLOT
    got = fused_quant_moe(x, ids, weights, w13, w2, host_slots, host_share=True, out=poisoned(T, D, x.dtype))
    assert not got.isnan().any(), UNWRITTEN
    assert torch.equal(got[0], torch.zeros(D, dtype=x.dtype, device=DEVICE))
    device_share = torch.where(torch.isin(ids, on_host), 0.0, weights)  # [T, K] the host's pairs weigh 0
    reference = expected(x, ids, device_share, w13, w2, slots)
    assert rel_rms(got, reference) < TOLERANCE[x.dtype]
    assert rel_rms(expected(x, ids, weights, w13, w2, slots), reference) > 0.1  # the host's share matters


@pytest.mark.parametrize("case", ["int4 g32 asym bf16, bfloat16", "int8, float32", "int8 g32 sym fp16, float32"])
def test_act_order_input_perm(case):
    """input_perm [S, D] in the records (GPTQ act order), each expert its own: w13 multiplies
    x[t, input_perm[slot]]. Expected: each pair on its own, its token's inputs permuted, through the
    reference, summed in k order."""
    (x, ids, weights, w13, w2, slots), _, input_perm = make_case(case, seed=4, act_order=True)
    T, D = x.shape
    got = fused_quant_moe(x, ids, weights, w13, w2, slots, input_perm=input_perm, out=poisoned(T, D, x.dtype))
    assert not got.isnan().any(), UNWRITTEN
    reference = torch.zeros(T, D)
    for t in range(T):
        for k in range(TOP_K):
            order = input_perm[slots[ids[t, k]]].long()  # [D] this expert's input order
            pair = (x[t : t + 1, order], ids[t : t + 1, k : k + 1], weights[t : t + 1, k : k + 1])
            reference[t] += expected(*pair, w13, w2, slots)[0].cpu()
    assert rel_rms(got, reference) < TOLERANCE[x.dtype]
    assert rel_rms(expected(x, ids, weights, w13, w2, slots), reference) > 0.1  # the order matters
    if DEVICE.type == "cpu":
        broken = input_perm.clone()
        broken[slots[ids[0, 0]], 0] = broken[slots[ids[0, 0]], 1]  # input 1 twice, input 0 never
        with pytest.raises(ValueError, match=r"input_perm of routed slots: expected permutations of 0 \.\. "):
            fused_quant_moe(x, ids, weights, w13, w2, slots, input_perm=broken)
        with pytest.raises(ValueError, match=rf"input_perm shape: expected \[{w13.q.shape[0]}, {D}\]"):
            fused_quant_moe(x, ids, weights, w13, w2, slots, input_perm=input_perm[:, :-1])


CONFIGS = {
    # several row and column tiles, and reduction steps cut to int4's groups or raised to 32
    "m16 n16 k16 g3": BlockConfig(block_m=16, block_n=16, block_k=16, group_m=3),
    "m32 n32 k128 g2": BlockConfig(block_m=32, block_n=32, block_k=128, group_m=2),
}


@pytest.mark.parametrize(
    "case", ["int4 g32 sym fp16, float32", "int8, float32", "int8 g32 asym bf16, bfloat16, clamped"]
)
@pytest.mark.parametrize("config", CONFIGS)
def test_block_configs(case, config):
    (x, ids, weights, w13, w2, slots), _ = make_case(case, seed=2)
    T, D = x.shape
    got = fused_quant_moe(x, ids, weights, w13, w2, slots, config=CONFIGS[config], out=poisoned(T, D, x.dtype))
    assert not got.isnan().any(), UNWRITTEN
    assert rel_rms(got, expected(x, ids, weights, w13, w2, slots)) < TOLERANCE[x.dtype]


def test_format_keys_tell_grouped_int8_apart():
    grouped, channel = quantize(torch.randn(1, 8, 64), **I8_G32_SYM_FP16), quantize(torch.randn(1, 8, 64), **INT8)
    int4 = quantize(torch.randn(1, 8, 64), **G32_SYM_FP16)
    assert quant_moe.format_key(grouped, grouped) == "int8g" and quant_moe.format_key(channel, channel) == "int8"
    assert (
        quant_moe.format_key(grouped, int4) == "int8g_int4" and quant_moe.format_key(channel, grouped) == "int8_int8g"
    )


def test_int4_block_k_lies_in_one_group():
    assert int4_block_k(16, 32) == 32  # raised: two dots of 16 inputs
    assert int4_block_k(128, 32) == 32  # cut to the group
    assert int4_block_k(64, 128) == 64
    assert int4_block_k(128, 128) == 128
    assert int4_block_k(128, 96) == 32  # G = K = 96: the largest power of two dividing it
    assert int4_block_k(128, 192) == 64


def test_no_tokens_give_zeros():
    (x, ids, weights, w13, w2, slots), _ = make_case("int8, float32")
    got = fused_quant_moe(x[:0], ids[:0], weights[:0], w13, w2, slots)
    assert got.shape == (0, x.shape[1]) and got.dtype == x.dtype


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the routing checks read the tensors: CPU only")
def test_bad_inputs_are_refused_with_what_was_found():
    (x, ids, weights, w13, w2, slots), _ = make_case("int4 g32 asym bf16, bfloat16")
    T, D = x.shape
    S = w13.q.shape[0]
    args = (x, ids, weights, w13, w2, slots)
    with pytest.raises(ValueError, match=r"x dtype: expected float16, bfloat16 or float32, found torch.int32"):
        fused_quant_moe(x.to(torch.int32), *args[1:])
    with pytest.raises(ValueError, match=r"topk_ids shape: expected \[6, K\], found \[5, 2\]"):
        fused_quant_moe(x, ids[:5], *args[2:])
    with pytest.raises(ValueError, match=r"topk_weights dtype: expected torch.float32, found torch.bfloat16"):
        fused_quant_moe(x, ids, weights.bfloat16(), *args[3:])
    with pytest.raises(ValueError, match=r"w13: expected a QuantizedMatrix, found Tensor"):
        fused_quant_moe(x, ids, weights, w13.q, w2, slots)
    with pytest.raises(ValueError, match=rf"w2 shape: expected \[{S}, {D}, 96\], found \[{S}, {D}, 64\]"):
        fused_quant_moe(x, ids, weights, w13, narrowed(w2), slots)
    with pytest.raises(ValueError, match=rf"w2 shape: expected \[{S}, {D}, 96\], found \[{S - 1}, {D}, 96\]"):
        fused_quant_moe(x, ids, weights, w13, w2[: S - 1], slots)
    with pytest.raises(ValueError, match=r"w13 q: expected a stack of slots \[S, N, K\], found \[192, 32\]"):
        fused_quant_moe(x, ids, weights, w13[0], w2, slots)
    with pytest.raises(ValueError, match=r"out dtype: expected torch.bfloat16, found torch.float32"):
        fused_quant_moe(*args, out=torch.empty(T, D))
    with pytest.raises(ValueError, match=r"activation: expected an ExpertActivation, found str"):
        fused_quant_moe(*args, activation="silu")
    unrouted = slots.clone()
    unrouted[ids[0, 0]] = -1  # a routed expert without a slot
    with pytest.raises(
        ValueError, match=rf"expert_slots of routed experts: expected slots in \[0, {S}\), found \[-1\]"
    ):
        fused_quant_moe(x, ids, weights, w13, w2, unrouted)
    on_host = slots.clone()
    on_host[ids[0, 0]] = HOST_SLOT
    with pytest.raises(ValueError, match=r"found \[-2\]"):  # HOST_SLOT needs host_share
        fused_quant_moe(x, ids, weights, w13, w2, on_host)
    with pytest.raises(
        ValueError, match=rf"topk_ids values: expected expert ids in \[0, {E}\), found ids in \[\d+, 9\]"
    ):
        fused_quant_moe(x, torch.where(ids == ids[0, 0], 9, ids), *args[2:])
    with pytest.raises(ValueError, match=r"block config format: expected lower-case letters"):
        block_configs.config_file_name(E, 96, D, torch.bfloat16, "Some_GPU", format="int4,x")


def narrowed(m: QuantizedMatrix) -> QuantizedMatrix:
    """m [S, N, K] cut to its first 64 inputs (two int4 groups of 32)."""
    zero = None if m.zero is None else m.zero[:, :, :2]
    return QuantizedMatrix(m.format, m.q[:, :, :32], m.scale[:, :, :2], zero, m.group_size)
