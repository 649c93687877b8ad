"""Quantized expert weights: the packed int8 and int4 layouts, round-to-nearest quantizers, and the
torch references: dequantize_int8 / dequantize_int8_grouped / dequantize_int4, and
quantized_moe_experts_reference, the experts computed on dequantized weights (the host kernels,
host_quant_experts.py, read the same arrays and dequantize in registers). The layouts are the ones
loaders/quant_formats.py unpacks GPTQ and compressed-tensors checkpoints into.

Shapes: a matrix is W [N, K], rows the outputs and K the input it is multiplied with (an expert's
w13 is [2F, D], gate rows then up rows; its w2 is [D, F]); G the group size of int4 and grouped
int8, a multiple of GROUP_QUANTUM (32) dividing K: 32, 64 or 128 as checkpoints mostly have them,
or K itself (one scale per output channel, GPTQ's group_size -1); K // G the groups of a row. Every
array may carry leading dimensions (a stack of S slots: [S, N, K]), the same for all arrays of one
matrix.

    format        array   dtype                  shape            meaning
    int8          q       int8                   [N, K]           W[n, k] = q[n, k] * scale[n]
    (group None)  scale   float32                [N]              per output channel, symmetric
    int8 grouped  q       int8                   [N, K]           unsigned code u minus 128
    (group G)     scale   float16 or bfloat16    [N, K // G]      per group of G consecutive inputs
                  zero    uint8 or None          [N, K // G]      the unsigned zero code (0..255),
                                                                  offset by 128 as q is; None: 128
                    W[n, k] = (q[n, k] + 128 - zero[n, k // G]) * scale[n, k // G]
    int4          q       uint8                  [N, K // 2]      byte j of row n: input 2j in its low
                                                                  nibble, input 2j + 1 in its high one
                  scale   float16 or bfloat16    [N, K // G]      per group of G consecutive inputs
                  zero    uint8 (0..15) or None  [N, K // G]      None: symmetric, zero 8
                    W[n, k] = (nibble(q, n, k) - zero[n, k // G]) * scale[n, k // G]

The rule for int8: group_size None is the per-channel layout (float32 scales, symmetric, no zero);
a group_size (K itself for one group a row) is the grouped layout, with 16-bit scales and an
optional zero (GPTQ 8-bit with groups or zero points, compressed-tensors W8A16 with groups, which
are served as they are). Rows are row-major and contiguous; a 16-bit scale's dtype is the
record's (checkpoints ship either, and both are read as they are: the kernels take the 16 bits and
widen them in registers). Every grouped dequantized weight is exact in float32: (q - zero) has at
most 5 bits (int4) or 9 (int8: q + 128 - zero in -255..255), a 16-bit scale at most 11, so their
product needs no rounding (per-channel int8's q * scale rounds once, as any float32 product).

Round to nearest (RTN), each element rounded half to even after dividing by its scale:
  int8: scale = max|W[n]| / 127, q = clamp(round(W / scale), -127, 127): the levels -127..127,
      symmetric (-128 unused), as torchao's int8 weight-only and vLLM's per-channel int8 do.
  int8 grouped (quantize_int8_grouped; checkpoints bring their own, this is for tests and for
      records of a grouped int8 format requested of other weights): symmetric, scale =
      max|W_g| / 127, q = clamp(round(W / scale), -127, 127), no zero; asymmetric, int4's min/max
      below with 255 steps, zero in 0..255 and q = clamp(round(W / scale) + zero, 0, 255) - 128.
  int4 symmetric: scale = max(-min(W_g) / 8, max(W_g) / 7), zero 8, q = clamp(round(W / scale) + 8,
      0, 15): torchao's SYMMETRIC_NO_CLIPPING_ERR. It uses all sixteen levels -8..7 (max|W| / 7
      leaves -8 unused) and never clips: GPTQ's sym scale 2 max|W| / 15 puts the largest magnitude
      at 7.5 steps, past the +7 level, and llama.cpp's Q4_0 (the extreme at -8 steps, scale
      max / -8) clips a value of the opposite sign and the same magnitude by a whole step. So every
      element is within scale / 2 of its value, and a matrix on the grid comes back exactly.
  int4 asymmetric: GPTQ's min/max with the range stretched to hold 0, lo = min(min(W_g), 0) and
      hi = max(max(W_g), 0): scale = (hi - lo) / 15, zero = round(-lo / scale) (an integer in 0..15,
      so 0 is exact), q = clamp(round(W / scale) + zero, 0, 15); within scale / 2 as well.
  A 16-bit scale is rounded up, to the nearest float16 / bfloat16 not below the float32 one, so
  that the grid it spans still covers the group and the scale / 2 bound holds for the scale stored.
  A zero row (int8) or group (int4, grouped int8) gets scale 1 and the code of 0 (q 0, or q = zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.reference import moe_experts_reference

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)  # the usual int4 groups of consecutive inputs
GROUP_QUANTUM = 32  # any G a multiple of it that divides K is accepted (the kernels read 32 inputs at a time)
SCALE_DTYPES = (torch.float16, torch.bfloat16)  # int4 and grouped int8 scales
INT8_MAX = 127
INT4_MAX = 15
INT4_SYMMETRIC_ZERO = 8
INT8_CODE_OFFSET = 128  # grouped int8: q = u - 128 for the unsigned code u; the zero of a symmetric matrix
UINT8_MAX = 255


@dataclass(frozen=True)
class QuantizedMatrix:
    """One quantized matrix W [..., N, K] in the layout above: format "int8" per channel (q int8
    [..., N, K], scale float32 [..., N], zero None, group_size None), "int8" grouped (q int8
    [..., N, K], scale float16 / bfloat16 [..., N, K // G], zero uint8 [..., N, K // G] offset by 128
    or None for symmetric, group_size G) or "int4" (q uint8 [..., N, K // 2], scale float16 /
    bfloat16 [..., N, K // G], zero uint8 [..., N, K // G] or None for symmetric, group_size G).
    Leading dimensions (slots) are shared by all arrays."""

    format: str
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_layout(self)

    @property
    def shape(self) -> tuple[int, ...]:
        """[..., N, K] of the float matrix it stands for."""
        *lead, N, packed = self.q.shape
        return (*lead, N, packed * 2 if self.format == "int4" else packed)

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def grouped_int8(self) -> bool:
        """The grouped int8 layout (16-bit scales per group, an optional zero)."""
        return self.format == "int8" and self.group_size is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized arrays (q, scale, zero): what a kernel reads of the matrix."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero) if t is not None)

    def __getitem__(self, index) -> QuantizedMatrix:
        """The same leading-dimension index of every array (e.g. one slot of a stack)."""
        zero = None if self.zero is None else self.zero[index]
        return QuantizedMatrix(self.format, self.q[index], self.scale[index], zero, self.group_size)


def check_layout(m: QuantizedMatrix) -> None:
    """Raise ValueError unless m's arrays have the dtypes and shapes of its format."""

    def found() -> str:
        zero = "None" if m.zero is None else f"{m.zero.dtype} {list(m.zero.shape)}"
        return (
            f"q {m.q.dtype} {list(m.q.shape)}, scale {m.scale.dtype} {list(m.scale.shape)}, zero {zero}, "
            f"group_size {m.group_size}"
        )

    if m.format not in FORMATS:
        raise ValueError(f"quantized matrix: expected a format among {', '.join(FORMATS)}, found {m.format!r}")
    if m.q.dim() < 2:
        raise ValueError(f"quantized matrix: expected q [..., N, K], found {found()}")
    lead, N = tuple(m.q.shape[:-2]), m.q.shape[-2]
    if m.format == "int8" and m.group_size is None:
        if m.q.dtype != torch.int8 or m.scale.dtype != torch.float32 or m.zero is not None:
            raise ValueError(f"int8 matrix: expected q int8, scale float32, no zero, no group size, found {found()}")
        if tuple(m.scale.shape) != (*lead, N):
            raise ValueError(f"int8 matrix: expected scale [..., N] matching q [..., N, K], found {found()}")
        return
    kind, packed = ("int8 grouped", "[..., N, K]") if m.format == "int8" else ("int4", "[..., N, K // 2]")
    K = m.q.shape[-1] if m.format == "int8" else 2 * m.q.shape[-1]
    if not _group_fits(m.group_size, K):
        raise ValueError(
            f"{kind} matrix: expected a group size, a multiple of {GROUP_QUANTUM}, dividing K = {K}, found {found()}"
        )
    groups = (*lead, N, K // m.group_size)
    q_dtype = torch.int8 if m.format == "int8" else torch.uint8
    if m.q.dtype != q_dtype or m.scale.dtype not in SCALE_DTYPES or tuple(m.scale.shape) != groups:
        raise ValueError(
            f"{kind} matrix: expected q {str(q_dtype).removeprefix('torch.')} {packed} and scale float16 or "
            f"bfloat16 [..., N, K // G], found {found()}"
        )
    if m.zero is not None and (m.zero.dtype != torch.uint8 or tuple(m.zero.shape) != groups):
        raise ValueError(f"{kind} matrix: expected zero uint8 [..., N, K // G] or None, found {found()}")


def _group_fits(group_size, K: int) -> bool:
    return isinstance(group_size, int) and group_size > 0 and group_size % GROUP_QUANTUM == 0 and K % group_size == 0


# ---------------------------------------------------------------------------------- nibbles


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """values [..., K] integers 0..15 (any integer dtype), K even -> uint8 [..., K // 2]: byte j
    holds values[2j] in its low nibble and values[2j + 1] in its high one."""
    if values.shape[-1] % 2:
        raise ValueError(f"pack_int4: expected an even last dimension, found {list(values.shape)}")
    if values.numel() and (values.min() < 0 or values.max() > INT4_MAX):
        raise ValueError(f"pack_int4: expected values in 0..15, found {int(values.min())}..{int(values.max())}")
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K], values 0..15 (pack_int4's inverse)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8, found {packed.dtype}")
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------------------------------------------------------------------------------- dequantize (references)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [..., N, K], scale float32 [..., N] -> W float32 [..., N, K] = q * scale."""
    return q.to(torch.float32) * scale.to(torch.float32)[..., None]


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """q uint8 [..., N, K // 2], scale float16 / bfloat16 [..., N, K // G], zero uint8 [..., N, K // G]
    or None (zero 8) -> W float32 [..., N, K] = (q - zero) * scale, group by group (exact)."""
    codes = unpack_int4(q).to(torch.float32)  # [..., N, K]
    *lead, N, K = codes.shape
    groups = codes.view(*lead, N, K // group_size, group_size)
    zeros = torch.full_like(scale, INT4_SYMMETRIC_ZERO, dtype=torch.float32) if zero is None else zero.float()
    return ((groups - zeros[..., None]) * scale.to(torch.float32)[..., None]).view(*lead, N, K)


def dequantize_int8_grouped(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """q int8 [..., N, K], scale float16 / bfloat16 [..., N, K // G], zero uint8 [..., N, K // G]
    (offset by 128 as q is) or None (128) -> W float32 [..., N, K] = (q + 128 - zero) * scale,
    group by group (exact: at most 9 x 11 significant bits)."""
    *lead, N, K = q.shape
    groups = q.to(torch.float32).view(*lead, N, K // group_size, group_size)
    offsets = torch.zeros_like(scale, dtype=torch.float32) if zero is None else zero.float() - INT8_CODE_OFFSET
    return ((groups - offsets[..., None]) * scale.to(torch.float32)[..., None]).view(*lead, N, K)


def dequantize(m: QuantizedMatrix) -> torch.Tensor:
    """m -> its float32 matrix [..., N, K]."""
    if m.grouped_int8:
        return dequantize_int8_grouped(m.q, m.scale, m.zero, m.group_size)
    if m.format == "int8":
        return dequantize_int8(m.q, m.scale)
    return dequantize_int4(m.q, m.scale, m.zero, m.group_size)


# ---------------------------------------------------------------------------------- RTN quantizers


def _float_input(w: torch.Tensor, where: str) -> torch.Tensor:
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w.dim() < 2:
        raise ValueError(f"{where}: expected a float32 / bfloat16 matrix [..., N, K], found {w.dtype} {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{where}: expected finite weights, found NaN or infinity")
    return w.to(torch.float32)


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive float32 scales -> the nearest `dtype` values not below them (float32 stays)."""
    if dtype == torch.float32:
        return scale
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"16-bit scale: expected float16 or bfloat16, found {dtype}")
    rounded = scale.to(dtype)
    if dtype == torch.float16 and (rounded.isinf().any() or (scale > torch.finfo(dtype).max).any()):
        raise ValueError(f"16-bit scale: a group's scale {float(scale.max()):.3g} overflows float16")
    below = rounded.to(torch.float32) < scale
    # the next representable value up: positive finite 16-bit floats order as their bits
    return torch.where(below, (rounded.view(torch.int16) + 1).view(dtype), rounded)


def quantize_int8(w: torch.Tensor) -> QuantizedMatrix:
    """W [..., N, K] float32 / bfloat16 -> int8 per output channel, symmetric, round to nearest."""
    w = _float_input(w, "quantize_int8")
    amax = w.abs().amax(dim=-1)  # [..., N]
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedMatrix("int8", q, scale)


def quantize_int8_grouped(
    w: torch.Tensor,
    group_size: int | None = 128,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedMatrix:
    """W [..., N, K] float32 / bfloat16 -> grouped int8 in groups of group_size inputs (None: K, one
    group a row), round to nearest: symmetric (levels -127..127, no zero) or asymmetric (min/max
    with a zero point in 0..255), scales stored as scale_dtype (rounded up); see the module
    docstring. (quantize_int8 is the per-channel float32-scale layout.)"""
    w = _float_input(w, "quantize_int8_grouped")
    *lead, N, K = w.shape
    group_size = K if group_size is None else group_size
    if not _group_fits(group_size, K):
        raise ValueError(
            f"quantize_int8_grouped: expected a group size, a multiple of {GROUP_QUANTUM}, dividing K = {K}, found "
            f"{group_size}"
        )
    groups = w.reshape(*lead, N, K // group_size, group_size)
    lo = groups.amin(dim=-1).clamp(max=0.0)  # [..., N, K // G] the range stretched to hold 0
    hi = groups.amax(dim=-1).clamp(min=0.0)
    scale = torch.maximum(-lo, hi) / INT8_MAX if symmetric else (hi - lo) / UINT8_MAX
    scale = _round_up_to(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    scale32 = scale.to(torch.float32)[..., None]
    if symmetric:
        codes = torch.round(groups / scale32).clamp_(-INT8_MAX, INT8_MAX)
        zero = None
    else:
        zero32 = torch.round(-lo / scale32[..., 0]).clamp_(0, UINT8_MAX)
        codes = (torch.round(groups / scale32) + zero32[..., None]).clamp_(0, UINT8_MAX) - INT8_CODE_OFFSET
        zero = zero32.to(torch.uint8)
    q = codes.reshape(*lead, N, K).to(torch.int8)
    return QuantizedMatrix("int8", q, scale, zero, group_size)


def quantize_int4(
    w: torch.Tensor,
    group_size: int | None = 32,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedMatrix:
    """W [..., N, K] float32 / bfloat16 -> int4 in groups of group_size inputs (None: K, one group a
    row), round to nearest:
    symmetric (zero 8, torchao's no-clipping scale) or asymmetric (GPTQ's min/max with a zero
    point), scales stored as scale_dtype (rounded up); see the module docstring."""
    w = _float_input(w, "quantize_int4")
    *lead, N, K = w.shape
    group_size = K if group_size is None else group_size
    if not _group_fits(group_size, K):
        raise ValueError(
            f"quantize_int4: expected a group size, a multiple of {GROUP_QUANTUM}, dividing K = {K}, found {group_size}"
        )
    groups = w.reshape(*lead, N, K // group_size, group_size)
    lo = groups.amin(dim=-1).clamp(max=0.0)  # [..., N, K // G] the range stretched to hold 0
    hi = groups.amax(dim=-1).clamp(min=0.0)
    if symmetric:
        scale = torch.maximum(-lo / INT4_SYMMETRIC_ZERO, hi / (INT4_MAX - INT4_SYMMETRIC_ZERO))  # -8 and +7 steps
    else:
        scale = (hi - lo) / INT4_MAX
    scale = _round_up_to(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    scale32 = scale.to(torch.float32)
    if symmetric:
        zero32 = torch.full_like(scale32, INT4_SYMMETRIC_ZERO)
    else:
        zero32 = torch.round(-lo / scale32).clamp_(0, INT4_MAX)
    codes = (torch.round(groups / scale32[..., None]) + zero32[..., None]).clamp_(0, INT4_MAX)
    q = pack_int4(codes.reshape(*lead, N, K).to(torch.uint8))
    zero = None if symmetric else zero32.to(torch.uint8)
    return QuantizedMatrix("int4", q, scale, zero, group_size)


def quantize(w: torch.Tensor, format: str, **options) -> QuantizedMatrix:
    """quantize_int8 or quantize_int4 (with its options) by format name; "int8" with options
    (group_size, symmetric, scale_dtype) is quantize_int8_grouped."""
    if format == "int8":
        return quantize_int8_grouped(w, **options) if options else quantize_int8(w)
    if format == "int4":
        return quantize_int4(w, **options)
    raise ValueError(f"quantize: expected a format among {', '.join(FORMATS)}, found {format!r}")


# ---------------------------------------------------------------------------------- expert reference


def quantized_moe_experts_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: QuantizedMatrix,
    w2: QuantizedMatrix,
    expert_slots: torch.Tensor,
    *,
    activation: ExpertActivation = SILU,
    input_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """moe_experts_reference (reference.py) in float32 on dequantized experts: each routed
    expert's w13 [S, 2F, D] and w2 [S, D, F] slot dequantized to float32 (only those), then the
    float reference. x: [T, D]; topk_ids, topk_weights: [T, K]; expert_slots: [E]; input_perm:
    [S, D] integer, each slot's w13 input order (w13 packs W13[:, perm]: its columns are put back
    in place, W13[:, perm] = dequantized); None: identity. Returns [T, D] float32."""
    routed = torch.unique(topk_ids.reshape(-1))  # [A] the routed experts
    used = torch.unique(expert_slots[routed])  # [U] their slots, ascending
    slots = torch.zeros_like(expert_slots)
    slots[routed] = torch.searchsorted(used, expert_slots[routed])  # [E] each routed expert's row of `used`
    w13_float = dequantize(w13[used])  # [U, 2F, D]
    if input_perm is not None:
        packed, w13_float = w13_float, torch.empty_like(w13_float)
        for row, slot in enumerate(used.tolist()):
            w13_float[row][:, input_perm[slot].long()] = packed[row]
    return moe_experts_reference(
        x.to(torch.float32),
        topk_ids,
        topk_weights.to(torch.float32),
        w13_float,
        dequantize(w2[used]),
        slots,
        activation=activation,
    )
