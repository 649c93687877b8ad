"""The int8 / grouped int8 / int4 layouts of quantize.py: nibble packing against hand-worked bytes,
dequantization by hand, RTN round trips within half a step of the stored scale, matrices on the
grid coming back exactly, zero rows and groups, scales rounded up, and the layout checks."""

import pytest
import torch

from moeinf.kernels.quantize import (
    QuantizedMatrix,
    dequantize,
    dequantize_int4,
    dequantize_int8_grouped,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_int8_grouped,
    unpack_int4,
)

INT4_CASES = [  # (group size, symmetric, scale dtype)
    (32, True, torch.float16),
    (32, False, torch.bfloat16),
    (64, True, torch.bfloat16),
    (64, False, torch.float16),
    (128, True, torch.float16),
    (128, False, torch.bfloat16),
]
INT4_IDS = [f"g{g}-{'sym' if s else 'asym'}-{str(d).removeprefix('torch.')}" for g, s, d in INT4_CASES]


def test_nibbles_pack_low_first_as_worked_by_hand():
    values = torch.tensor([[1, 2, 15, 0, 7, 8], [0, 15, 10, 11, 4, 4]])
    packed = pack_int4(values)
    # byte j = values[2j] | values[2j + 1] << 4: 0x21, 0x0F, 0x87 and 0xF0, 0xBA, 0x44
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x0F, 0x87], [0xF0, 0xBA, 0x44]]
    assert torch.equal(unpack_int4(packed), values.to(torch.uint8))
    with pytest.raises(ValueError, match="expected values in 0..15, found 0..16"):
        pack_int4(torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="expected an even last dimension"):
        pack_int4(torch.tensor([1, 2, 3]))


def test_int4_dequantizes_as_worked_by_hand():
    """One row of two groups of 32: the first asymmetric-style (zero 3, scale 0.5), the second
    zero 8, scale 2 (as a symmetric group would be)."""
    codes = torch.arange(64) % 16  # [64]
    q = pack_int4(codes)[None]  # [1, 32]
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    zero = torch.tensor([[3, 8]], dtype=torch.uint8)
    expected = torch.cat([(codes[:32] - 3) * 0.5, (codes[32:] - 8) * 2.0]).float()[None]
    assert torch.equal(dequantize_int4(q, scale, zero, 32), expected)
    symmetric = dequantize_int4(q, scale, None, 32)  # zero 8 everywhere
    assert torch.equal(symmetric, torch.cat([(codes[:32] - 8) * 0.5, (codes[32:] - 8) * 2.0]).float()[None])


def test_grouped_int8_dequantizes_as_worked_by_hand():
    """One row of two groups of 32: unsigned codes u = q + 128; the first group zero 130, scale 0.5,
    the second without zeros (128) scale 2; the extremes -128 and 127 reach 9 significant bits."""
    q = (torch.arange(64) * 4 - 128).to(torch.int8)[None]  # [1, 64] -128, -124, ..., 124
    q[0, -1] = 127
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.bfloat16)
    zero = torch.tensor([[130, 128]], dtype=torch.uint8)
    u = q.long() + 128
    expected = torch.cat([(u[0, :32] - 130) * 0.5, (u[0, 32:] - 128) * 2.0]).float()[None]
    assert torch.equal(dequantize_int8_grouped(q, scale, zero, 32), expected)
    assert float(expected[0, 0]) == -65.0 and float(expected[0, -1]) == 254.0
    m = QuantizedMatrix("int8", q, scale, zero, 32)
    assert m.grouped_int8 and torch.equal(dequantize(m), expected)
    symmetric = dequantize(QuantizedMatrix("int8", q, scale, None, 32))  # zero 128: W = q * scale
    assert torch.equal(symmetric, (q.float() * scale.float().repeat_interleave(32, dim=1)))


def random_weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1], generator=g)[..., None]  # rows of varied scale
    w[..., 0, :] = 0.0  # a zero row (and zero groups)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_is_within_half_a_step(dtype):
    w = random_weights((3, 40, 100), dtype)
    m = quantize_int8(w)
    assert m.q.dtype == torch.int8 and m.scale.dtype == torch.float32 and m.shape == (3, 40, 100)
    assert int(m.q.min()) >= -127
    error = (dequantize(m) - w.float()).abs()
    # half a step, and the float32 roundings of q * scale (|q| <= 127: 127 * 2^-24 of a step)
    assert (error <= m.scale[..., None] * (0.5 + 1e-5)).all()
    assert torch.equal(m.scale[:, 0], torch.ones(3)) and not m.q[:, 0].any()  # a zero row: scale 1, q 0
    assert m.nbytes == 3 * 40 * 100 + 3 * 40 * 4


@pytest.mark.parametrize("group,symmetric,scale_dtype", INT4_CASES, ids=INT4_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_is_within_half_a_step(group, symmetric, scale_dtype, dtype):
    w = random_weights((2, 24, 384), dtype, seed=group)
    m = quantize_int4(w, group, symmetric=symmetric, scale_dtype=scale_dtype)
    assert m.q.shape == (2, 24, 192) and m.scale.shape == (2, 24, 384 // group) and m.scale.dtype == scale_dtype
    assert (m.zero is None) == symmetric and m.shape == (2, 24, 384)
    scale = m.scale.float().repeat_interleave(group, dim=-1)  # [2, 24, 384] each element's stored scale
    error = (dequantize(m) - w.float()).abs()
    assert (error <= scale * (0.5 + 1e-6)).all()  # (q - zero) * scale is exact; W / scale rounds once
    # a zero row's groups: scale 1 and the code of 0 (8 symmetric; zero 0 and code 0 asymmetric)
    assert (m.scale[:, 0] == 1).all() and (unpack_int4(m.q[:, 0]) == (8 if symmetric else 0)).all()
    assert symmetric or not m.zero[:, 0].any()


@pytest.mark.parametrize("group,symmetric,scale_dtype", INT4_CASES + [(None, False, torch.float16)])
def test_grouped_int8_round_trip_is_within_half_a_step(group, symmetric, scale_dtype):
    w = random_weights((2, 24, 384), torch.float32, seed=3)
    m = quantize_int8_grouped(w, group, symmetric=symmetric, scale_dtype=scale_dtype)
    G = group or 384
    assert m.format == "int8" and m.group_size == G and m.q.dtype == torch.int8 and m.q.shape == (2, 24, 384)
    assert m.scale.shape == (2, 24, 384 // G) and m.scale.dtype == scale_dtype and (m.zero is None) == symmetric
    assert symmetric or int(m.q.min()) == -128  # asymmetric codes use all 256 levels
    scale = m.scale.float().repeat_interleave(G, dim=-1)
    error = (dequantize(m) - w).abs()
    assert (error <= scale * (0.5 + 1e-6)).all() and error.max() > 0.1 * scale.min()
    # a zero row's groups: scale 1 and the code of 0
    assert (m.scale[:, 0] == 1).all() and not dequantize(m)[:, 0].any()


def grid_scales(shape, dtype, seed):
    """Random positive scales exactly representable in `dtype` (and float32)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 0.1 + 1e-3).to(dtype).float()


def test_an_int8_grid_matrix_round_trips_exactly():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (2, 16, 50), generator=g)
    q[..., 7] = torch.where(torch.rand(2, 16, generator=g) < 0.5, -127, 127)  # every row reaches +-127
    scale = grid_scales((2, 16), torch.float16, seed=2)  # 11-bit mantissas: 127 * scale / 127 is exact
    m = quantize_int8(q * scale[..., None])
    assert torch.equal(m.q, q.to(torch.int8)) and torch.equal(m.scale, scale)
    assert torch.equal(dequantize(m), q * scale[..., None])


@pytest.mark.parametrize("group,symmetric,scale_dtype", INT4_CASES, ids=INT4_IDS)
def test_an_int4_grid_matrix_round_trips_exactly(group, symmetric, scale_dtype):
    g = torch.Generator().manual_seed(group)
    N, K = 8, 256
    codes = torch.randint(0, 16, (N, K), generator=g)
    groups = codes.view(N, K // group, group)
    if symmetric:
        zero = torch.full((N, K // group), 8)
        groups[..., 3] = torch.where(torch.rand(N, K // group, generator=g) < 0.5, 0, 15)  # -8 or +7 steps binds
    else:
        zero = torch.randint(0, 16, (N, K // group), generator=g)
        groups[..., 3], groups[..., 4] = 0, 15  # the group spans the whole grid
    scale = grid_scales((N, K // group), scale_dtype, seed=group + 1)
    w = ((groups - zero[..., None]) * scale[..., None]).view(N, K)
    m = quantize_int4(w, group, symmetric=symmetric, scale_dtype=scale_dtype)
    assert torch.equal(unpack_int4(m.q), codes.to(torch.uint8))
    assert torch.equal(m.scale.float(), scale)
    assert symmetric or torch.equal(m.zero, zero.to(torch.uint8))
    assert torch.equal(dequantize(m), w)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_16_bit_scales_round_up(scale_dtype):
    """The stored scale is never below the float32 one: the grid still covers the group."""
    w = random_weights((64, 256), torch.float32, seed=5)
    stored = quantize_int4(w, 32, scale_dtype=scale_dtype).scale.float()[1:]
    groups = w[1:].view(63, 8, 32)
    wanted = torch.maximum(-groups.amin(-1).clamp(max=0) / 8, groups.amax(-1).clamp(min=0) / 7)
    assert (stored >= wanted).all()
    assert (stored < wanted * (1 + 2 * torch.finfo(scale_dtype).eps)).all()  # by at most one step


def test_layouts_are_checked_with_what_was_found():
    m = quantize_int4(torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match=r"int4 matrix: expected q uint8 .* found q torch.int8"):
        QuantizedMatrix("int4", m.q.view(torch.int8), m.scale, None, 32)
    with pytest.raises(ValueError, match=r"expected a group size, a multiple of 32, dividing K = 64, found q"):
        QuantizedMatrix("int4", m.q, m.scale, None, 128)
    with pytest.raises(ValueError, match=r"expected zero uint8 \[..., N, K // G\] or None"):
        QuantizedMatrix("int4", m.q, m.scale, torch.zeros(4, 3, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match="int8 matrix: expected q int8, scale float32"):
        QuantizedMatrix("int8", m.q, m.scale)
    g = quantize_int8_grouped(torch.randn(4, 64), 32, symmetric=False)
    with pytest.raises(ValueError, match=r"int8 grouped matrix: expected q int8 \[..., N, K\] and scale float16"):
        QuantizedMatrix("int8", g.q, g.scale.float(), g.zero, 32)
    with pytest.raises(ValueError, match=r"int8 grouped matrix: expected a group size, .* dividing K = 64, found"):
        QuantizedMatrix("int8", g.q, g.scale, g.zero, 48)
    with pytest.raises(ValueError, match=r"int8 grouped matrix: expected zero uint8 \[..., N, K // G\] or None"):
        QuantizedMatrix("int8", g.q, g.scale, g.zero.to(torch.int8), 32)
    with pytest.raises(ValueError, match="int8 matrix: expected q int8, scale float32, no zero"):
        QuantizedMatrix("int8", g.q, g.scale, g.zero)  # 16-bit scales without a group size
    with pytest.raises(ValueError, match="expected a format among int8, int4, found 'int2'"):
        QuantizedMatrix("int2", m.q, m.scale)
    with pytest.raises(ValueError, match="expected a group size, a multiple of 32, dividing K = 96, found 64"):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="dividing K = 96, found 48"):
        quantize_int4(torch.randn(4, 96), 48)
    assert quantize_int4(torch.randn(4, 96), None).group_size == 96  # one group a row
    with pytest.raises(ValueError, match="expected finite weights"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    assert m[0:2].q.shape == (2, 32) and m.nbytes == 4 * 32 + 4 * 2 * 2
