"""Routed experts computed on the host (CPU) straight from int8 / grouped int8 / int4 quantized
weights (the layouts of quantize.py), at memory bandwidth where the arithmetic allows: each weight is read once per call
as its packed bytes and dequantized in registers, never into a float copy of the matrix.

The job is host_experts.py's layer kernel with quantized w13 [S, 2F, D] and w2 [S, D, F] and float32
tokens: the (token, k) pairs sorted by expert, every active expert's gate/up rows in one parallel
pass over (expert, block of ROWS_PER_ITEM rows), the activation, every down row in a second pass,
then each token's K weighted outputs summed in k order, all in float32. A matrix is read where it
sits: each array of it (q, scale, zero) [S, ...] may be a strided view into store records, as long
as each slot's block is contiguous.

Numba's auto-vectoriser cannot keep a vector accumulator across int4 groups (it closes each
vectorised inner loop with a horizontal sum, one per group), so the dot products are written with an
explicit 16-lane float32 vector (an LLVM <16 x float>: one AVX-512 register, two AVX2 ones) and a
few intrinsics: load, fused multiply-add, a horizontal sum in a fixed tree, int8 / nibble loads. A
tile is 4 weight rows x 4 tokens (x 1 for a lone token; tokens past the last repeat it):
   int8: q widened to float32 (exact), multiplied with the tokens' inputs; the row's scale is
      applied once to each sum.
   grouped int8: q widened to float32 and multiply-added with its group's scale and offset
      (-(zero - 128) * scale): (q + 128 - zero) * scale, the reference's weight exactly (9 x 11
      significant bits need no rounding), then multiplied with the inputs as int8's are. Groups
      are multiples of 32 inputs, so a group is whole 16-lane vectors.
   int4: 16 bytes of a row hold 32 inputs, the low nibbles the even ones and the high nibbles the
      odd ones; the tokens' inputs are deinterleaved to match once per call (_permuted: within each
      chunk of 32, the 16 even inputs then the 16 odd ones), so both halves meet plain loads. Each
      group's 16 possible values, (code - zero) * scale, form one vector (its table); on AVX-512
      vpermps looks 16 codes up in it in one instruction (LOOKUP), elsewhere the codes are widened
      and multiply-added with the scale. Either way each weight equals the reference's exactly
      (a 4-bit code times an 11-bit scale needs no rounding).
   int4 and grouped int8: the scales (float16 or bfloat16 bits, as stored) and zeros are widened
      once per block of rows into a float32 table (_group_table).
Only the order of float32 additions differs from the reference (16 lanes and a tree here, torch's
matmul there; int8 also scales after the sum instead of rounding q * scale first): outputs agree
with quantized_moe_experts_reference to ~1e-7 relative, within TOLERANCE[float32]. The order is fixed
by the code, not by where a slot sits, so record views and resident stacks give the same bits.

Every intrinsic lives in this file: Numba's cache keys each function by its own source file, and a
cached kernel would not see an edit to an intrinsic kept elsewhere.
"""

from __future__ import annotations

import ctypes
import weakref

import numba
import numpy as np
import torch
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic, models, register_model

from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.host_experts import SecondBuffers
from moeinf.kernels.numba_cache import CALLS_PARALLEL
from moeinf.kernels.quantize import INT4_SYMMETRIC_ZERO, INT8_CODE_OFFSET, QuantizedMatrix

MAX_TOKENS = 32  # tokens a call is meant for (decode)
ROWS_PER_ITEM = 32  # weight rows one parallel work item computes
LANES = 16  # float32 lanes of the vector the dot products run in
CHUNK = 2 * LANES  # int4 inputs of one 16-byte load
# The weights are prefetched this many blocks of 4 rows ahead: int4 / int8 rows are short (2 KB for
# 4096 int4 inputs), the hardware prefetcher stops at each 4 KB page, and the arithmetic between two
# 16-byte loads keeps few cache lines in flight; asking for them early restores the stream.
AHEAD = 3
ACTIVATIONS = {"silu": 0, "clamped_swiglu": 1}
INT8, INT4, INT8_GROUPED = 0, 1, 2  # a _matrix tuple's layout code
FAST = {"reassoc", "contract"}  # the scalar passes (activation, combine); NaN and infinity kept


# ---------------------------------------------------------------------------------- the vector

_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_I32 = ir.IntType(32)


class _Vector(types.Type):
    """LANES float32 lanes in one SSA value (LLVM <16 x float>)."""

    def __init__(self):
        super().__init__(name="f32x16")


vector = _Vector()


@register_model(_Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


def _element_pointer(context, builder, array_type, array, index_type, index):
    """Pointer to element `index` of a C-contiguous array, counted flat (no wraparound, no check)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [context.cast(builder, index, index_type, types.intp)])


def _is_array_of(array, dtype) -> bool:
    return isinstance(array, types.Array) and array.dtype == dtype and array.layout == "C"


@intrinsic
def _vload(typingctx, array, index):
    """array[index : index + 16] of a float32 array, flat index."""
    if not _is_array_of(array, types.float32) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.load(builder.bitcast(pointer, _VEC.as_pointer()), align=4)

    return vector(array, index), codegen


@intrinsic
def _vload_int8(typingctx, array, index):
    """array[index : index + 16] of a uint8 array holding int8 bytes, widened to float32 (exact)."""
    if not _is_array_of(array, types.uint8) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        bytes_ = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(8), LANES).as_pointer()), align=1)
        return builder.sitofp(bytes_, _VEC)

    return vector(array, index), codegen


def _targets_avx512() -> bool:
    """Whether Numba compiles for a CPU with AVX-512F (the host's, or NUMBA_CPU_NAME's features)."""
    if numba_config.CPU_NAME:
        return "+avx512f" in (numba_config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


# AVX-512's vpermps looks 16 lanes up in a 16-float table in one instruction: the int4 codes index
# their group's 16 dequantized values, no conversion or multiply (twice the speed of widening them and
# multiplying). Decided when the kernels compile, not per call: a run-time branch between the two
# in the inner loop made a tile up to 1.7x slower in isolation. Numba's cache keys each compiled kernel by the target CPU, so
# NUMBA_CPU_NAME=haswell compiles (and caches) the widening path beside this one.
LOOKUP = _targets_avx512() and LANES == 16


@intrinsic
def _vtable(typingctx, scale, offset):
    """The 16 values of a group, (i - zero) * scale = i * scale + offset for codes i = 0..15 (exact);
    scale, offset: vectors of the group's scale and -zero * scale."""
    if not (scale == offset == vector):
        return None

    def codegen(context, builder, signature, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3), f"llvm.fma.v{LANES}f32")
        codes = ir.Constant(_VEC, [float(i % 16) for i in range(LANES)])
        return builder.call(fma, [codes, args[0], args[1]])

    return vector(scale, offset), codegen


@intrinsic
def _vdequantize(typingctx, array, index, table, scale, offset):
    """16 bytes array[index : index + 16] of int4 codes -> (even inputs, odd inputs) dequantized to
    float32: the low nibbles' and the high nibbles' values, looked up in the group's table (on an
    AVX-512 target) or widened and multiplied with its scale and offset (elsewhere)."""
    if not _is_array_of(array, types.uint8) or not isinstance(index, types.Integer):
        return None
    if not (table == scale == offset == vector):
        return None
    pair = types.UniTuple(vector, 2)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        bytes_ = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(8), LANES).as_pointer()), align=1)
        ints = ir.VectorType(_I32, LANES)
        wide = builder.zext(bytes_, ints)
        high = builder.lshr(wide, ir.Constant(ints, [4] * LANES))

        def widened():
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VEC, [_VEC] * 3), f"llvm.fma.v{LANES}f32"
            )
            low = builder.and_(wide, ir.Constant(ints, [15] * LANES))
            return [builder.call(fma, [builder.sitofp(v, _VEC), args[3], args[4]]) for v in (low, high)]

        if not LOOKUP:
            return context.make_tuple(builder, pair, widened())
        # vpermps reads the low 4 bits of each index: the low nibble needs no mask
        permute = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, ints]), "llvm.x86.avx512.permvar.sf.512"
        )
        return context.make_tuple(
            builder, pair, [builder.call(permute, [args[2], wide]), builder.call(permute, [args[2], high])]
        )

    return pair(array, index, table, scale, offset), codegen


@intrinsic
def _vload_scales(typingctx, array, index, bf16):
    """array[index : index + 16] of a uint16 array of float16 (bf16 False) or bfloat16 (True) bits,
    widened to float32 (exact)."""
    if not _is_array_of(array, types.uint16) or not isinstance(index, types.Integer) or bf16 != types.boolean:
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        bits = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(16), LANES).as_pointer()), align=2)
        half = builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), LANES)), _VEC)
        ints = ir.VectorType(_I32, LANES)
        brain = builder.bitcast(builder.shl(builder.zext(bits, ints), ir.Constant(ints, [16] * LANES)), _VEC)
        return builder.select(args[2], brain, half)

    return vector(array, index, bf16), codegen


@intrinsic
def _vload_bytes(typingctx, array, index):
    """array[index : index + 16] of a uint8 array as float32 (the int4 zero points)."""
    if not _is_array_of(array, types.uint8) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        bytes_ = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(8), LANES).as_pointer()), align=1)
        return builder.uitofp(bytes_, _VEC)

    return vector(array, index), codegen


@intrinsic
def _vstore(typingctx, array, index, value):
    """array[index : index + 16] = value, a float32 array, flat index."""
    if not _is_array_of(array, types.float32) or not isinstance(index, types.Integer) or value != vector:
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        builder.store(args[2], builder.bitcast(pointer, _VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(array, index, value), codegen


@intrinsic
def _vstore_interleaved(typingctx, array, index, even, odd):
    """array[index + 2i] = even[i], array[index + 2i + 1] = odd[i] for i < 16: 32 float32 in
    input order from a 16-byte int4 chunk's two halves (flat index)."""
    if not _is_array_of(array, types.float32) or not isinstance(index, types.Integer) or not even == odd == vector:
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        order = [lane for i in range(LANES) for lane in (i, LANES + i)]  # even 0, odd 0, even 1, ...
        both = builder.shuffle_vector(args[2], args[3], ir.Constant(ir.VectorType(_I32, 2 * LANES), order))
        builder.store(both, builder.bitcast(pointer, ir.VectorType(_F32, 2 * LANES).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(array, index, even, odd), codegen


@intrinsic
def _at(typingctx, array, index):
    """array[index], flat, without negative-index wraparound (the kernels' indices are >= 0)."""
    if not isinstance(array, types.Array) or array.layout != "C" or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.load(pointer)

    return array.dtype(array, index), codegen


@intrinsic
def _int8_at(typingctx, array, index):
    """array[index] of a uint8 array holding int8 bytes, as float32 (exact)."""
    if not _is_array_of(array, types.uint8) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.sitofp(builder.load(pointer), _F32)

    return types.float32(array, index), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask for the cache line of array[index] (flat) ahead of its use; never faults, even past the end."""
    if not isinstance(array, types.Array) or array.layout != "C" or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        bytes_pointer = ir.IntType(8).as_pointer()
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [bytes_pointer] + [_I32] * 3), "llvm.prefetch.p0i8"
        )
        # read, keep in all cache levels, data
        builder.call(prefetch, [builder.bitcast(pointer, bytes_pointer), *(ir.Constant(_I32, v) for v in (0, 3, 1))])
        return context.get_dummy_value()

    return types.none(array, index), codegen


@intrinsic
def _vsplat(typingctx, value):
    """value in every lane."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(
            one, ir.Constant(_VEC, ir.Undefined), ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
        )

    return vector(value), codegen


@intrinsic
def _vzero(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VEC, [0.0] * LANES)

    return vector(), codegen


@intrinsic
def _vfma(typingctx, a, b, c):
    """a * b + c, lane by lane, one rounding."""
    if not (a == b == c == vector):
        return None

    def codegen(context, builder, signature, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3), f"llvm.fma.v{LANES}f32")
        return builder.call(fma, args)

    return vector(a, b, c), codegen


@intrinsic
def _vmul(typingctx, a, b):
    if not (a == b == vector):
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(*args)

    return vector(a, b), codegen


@intrinsic
def _vadd(typingctx, a, b):
    if not (a == b == vector):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(*args)

    return vector(a, b), codegen


@intrinsic
def _vsum(typingctx, a):
    """The sum of a's lanes: halves added pairwise, 16 -> 8 -> 4 -> 2 -> 1 (a fixed order)."""
    if a != vector:
        return None

    def codegen(context, builder, signature, args):
        value, width = args[0], LANES
        while width > 1:
            width //= 2
            mask = ir.VectorType(_I32, width)
            low = builder.shuffle_vector(value, value, ir.Constant(mask, list(range(width))))
            high = builder.shuffle_vector(value, value, ir.Constant(mask, list(range(width, 2 * width))))
            value = builder.fadd(low, high)
        return builder.extract_element(value, ir.Constant(_I32, 0))

    return types.float32(a), codegen


@intrinsic
def _scale_value(typingctx, bits, bf16):
    """One float16 (bf16 False) or bfloat16 (True) scale's uint16 bits -> float32 (exact)."""
    if bits != types.uint16 or bf16 != types.boolean:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
        brain = builder.bitcast(builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16)), _F32)
        return builder.select(args[1], brain, half)

    return types.float32(bits, bf16), codegen


# ---------------------------------------------------------------------------------- int8 tiles


@njit(cache=True)
def _int8_one(q, qb, K, xs, xb, out, o, col):
    """out[o, col + i] = (q row i . xs token) for the 4 rows at flat q[qb + i * K], i < 4, and one
    token at flat xs[xb]; unscaled (the caller multiplies by the row's scale). Two accumulators a
    row, so that the fused multiply-adds of a row do not wait on each other."""
    a0 = _vzero()
    a1 = _vzero()
    a2 = _vzero()
    a3 = _vzero()
    b0 = _vzero()
    b1 = _vzero()
    b2 = _vzero()
    b3 = _vzero()
    r1, r2, r3 = qb + K, qb + 2 * K, qb + 3 * K
    ahead = qb + 4 * AHEAD * K  # 4 rows AHEAD blocks on: a cache line of them fetched per line of these read
    k = 0
    while k + 2 * LANES <= K:
        _prefetch(q, ahead + 2 * k)
        _prefetch(q, ahead + 2 * k + 64)
        x = _vload(xs, xb + k)
        a0 = _vfma(_vload_int8(q, qb + k), x, a0)
        a1 = _vfma(_vload_int8(q, r1 + k), x, a1)
        a2 = _vfma(_vload_int8(q, r2 + k), x, a2)
        a3 = _vfma(_vload_int8(q, r3 + k), x, a3)
        x = _vload(xs, xb + k + LANES)
        b0 = _vfma(_vload_int8(q, qb + k + LANES), x, b0)
        b1 = _vfma(_vload_int8(q, r1 + k + LANES), x, b1)
        b2 = _vfma(_vload_int8(q, r2 + k + LANES), x, b2)
        b3 = _vfma(_vload_int8(q, r3 + k + LANES), x, b3)
        k += 2 * LANES
    if k + LANES <= K:
        x = _vload(xs, xb + k)
        a0 = _vfma(_vload_int8(q, qb + k), x, a0)
        a1 = _vfma(_vload_int8(q, r1 + k), x, a1)
        a2 = _vfma(_vload_int8(q, r2 + k), x, a2)
        a3 = _vfma(_vload_int8(q, r3 + k), x, a3)
        k += LANES
    s0 = _vsum(_vadd(a0, b0))
    s1 = _vsum(_vadd(a1, b1))
    s2 = _vsum(_vadd(a2, b2))
    s3 = _vsum(_vadd(a3, b3))
    while k < K:
        value = _at(xs, xb + k)
        s0 += _int8_at(q, qb + k) * value
        s1 += _int8_at(q, r1 + k) * value
        s2 += _int8_at(q, r2 + k) * value
        s3 += _int8_at(q, r3 + k) * value
        k += 1
    out[o, col], out[o, col + 1], out[o, col + 2], out[o, col + 3] = s0, s1, s2, s3


@njit(cache=True)
def _int8_four(q, qb, K, xs, xa, xb, xc, xd, out, oa, ob, oc, od, col):
    """_int8_one for 4 tokens (flat xs offsets xa..xd, output rows oa..od; a token may repeat):
    each weight vector loaded and widened once for the 4 tokens."""
    a0 = _vzero()
    a1 = _vzero()
    a2 = _vzero()
    a3 = _vzero()
    b0 = _vzero()
    b1 = _vzero()
    b2 = _vzero()
    b3 = _vzero()
    c0 = _vzero()
    c1 = _vzero()
    c2 = _vzero()
    c3 = _vzero()
    d0 = _vzero()
    d1 = _vzero()
    d2 = _vzero()
    d3 = _vzero()
    r1, r2, r3 = qb + K, qb + 2 * K, qb + 3 * K
    ahead = qb + 4 * AHEAD * K  # 4 rows AHEAD blocks on, a cache line of them per 16 inputs of these
    k = 0
    while k + LANES <= K:
        _prefetch(q, ahead + 4 * k)
        w0 = _vload_int8(q, qb + k)
        w1 = _vload_int8(q, r1 + k)
        w2 = _vload_int8(q, r2 + k)
        w3 = _vload_int8(q, r3 + k)
        x = _vload(xs, xa + k)
        a0, a1, a2, a3 = _vfma(w0, x, a0), _vfma(w1, x, a1), _vfma(w2, x, a2), _vfma(w3, x, a3)
        x = _vload(xs, xb + k)
        b0, b1, b2, b3 = _vfma(w0, x, b0), _vfma(w1, x, b1), _vfma(w2, x, b2), _vfma(w3, x, b3)
        x = _vload(xs, xc + k)
        c0, c1, c2, c3 = _vfma(w0, x, c0), _vfma(w1, x, c1), _vfma(w2, x, c2), _vfma(w3, x, c3)
        x = _vload(xs, xd + k)
        d0, d1, d2, d3 = _vfma(w0, x, d0), _vfma(w1, x, d1), _vfma(w2, x, d2), _vfma(w3, x, d3)
        k += LANES
    sa0, sa1, sa2, sa3 = _vsum(a0), _vsum(a1), _vsum(a2), _vsum(a3)
    sb0, sb1, sb2, sb3 = _vsum(b0), _vsum(b1), _vsum(b2), _vsum(b3)
    sc0, sc1, sc2, sc3 = _vsum(c0), _vsum(c1), _vsum(c2), _vsum(c3)
    sd0, sd1, sd2, sd3 = _vsum(d0), _vsum(d1), _vsum(d2), _vsum(d3)
    while k < K:
        v0 = _int8_at(q, qb + k)
        v1 = _int8_at(q, r1 + k)
        v2 = _int8_at(q, r2 + k)
        v3 = _int8_at(q, r3 + k)
        value = _at(xs, xa + k)
        sa0, sa1, sa2, sa3 = sa0 + v0 * value, sa1 + v1 * value, sa2 + v2 * value, sa3 + v3 * value
        value = _at(xs, xb + k)
        sb0, sb1, sb2, sb3 = sb0 + v0 * value, sb1 + v1 * value, sb2 + v2 * value, sb3 + v3 * value
        value = _at(xs, xc + k)
        sc0, sc1, sc2, sc3 = sc0 + v0 * value, sc1 + v1 * value, sc2 + v2 * value, sc3 + v3 * value
        value = _at(xs, xd + k)
        sd0, sd1, sd2, sd3 = sd0 + v0 * value, sd1 + v1 * value, sd2 + v2 * value, sd3 + v3 * value
        k += 1
    out[oa, col], out[oa, col + 1], out[oa, col + 2], out[oa, col + 3] = sa0, sa1, sa2, sa3
    out[ob, col], out[ob, col + 1], out[ob, col + 2], out[ob, col + 3] = sb0, sb1, sb2, sb3
    out[oc, col], out[oc, col + 1], out[oc, col + 2], out[oc, col + 3] = sc0, sc1, sc2, sc3
    out[od, col], out[od, col + 1], out[od, col + 2], out[od, col + 3] = sd0, sd1, sd2, sd3


@njit(cache=True)
def _int8_row(q, qb, K, xs, xb, out, o, col):
    """out[o, col] = q row at flat q[qb] . xs token at flat xs[xb], unscaled: one row (the last
    rows of a matrix whose height is not a multiple of 4)."""
    a = _vzero()
    k = 0
    while k + LANES <= K:
        a = _vfma(_vload_int8(q, qb + k), _vload(xs, xb + k), a)
        k += LANES
    total = _vsum(a)
    while k < K:
        total += _int8_at(q, qb + k) * _at(xs, xb + k)
        k += 1
    out[o, col] = total


@njit(cache=True)
def _tile_tokens(p0, count, i):
    """The 4 token rows of the tile at token i of rows p0 : p0 + count, the missing ones the last
    repeated (computed twice, written alike)."""
    last = p0 + count - 1
    return p0 + i, min(p0 + i + 1, last), min(p0 + i + 2, last), min(p0 + i + 3, last)


@njit(cache=True)
def _rows_int8(m, slot, first, last, p0, count, xs, out, K):
    """out[p0 : p0 + count, first:last] = those token rows of xs @ W^T for rows first:last of slot
    `slot` of the int8 matrix m (a _matrix tuple): W = q * scale."""
    q, scale = m[0], m[3]
    qe = m[1] + slot * m[2]  # the slot's q [N, K] starts here
    se = m[5] + slot * m[6]
    r = first
    while r < last:
        quad = r + 4 <= last
        i = 0
        while i < count:
            pa = p0 + i
            if not quad:
                _int8_row(q, qe + r * K, K, xs, pa * K, out, pa, r)
                i += 1
            elif count - i == 1:
                _int8_one(q, qe + r * K, K, xs, pa * K, out, pa, r)
                i += 1
            else:
                pa, pb, pc, pd = _tile_tokens(p0, count, i)
                _int8_four(q, qe + r * K, K, xs, pa * K, pb * K, pc * K, pd * K, out, pa, pb, pc, pd, r)
                i += 4
        rows = 4 if quad else 1
        for row in range(r, r + rows):
            s = _at(scale, se + row)
            for pair in range(p0, p0 + count):
                out[pair, row] *= s
        r += rows


# ---------------------------------------------------------------------------------- int4 tiles


@njit(cache=True)
def _int4_one(q, qb, H, sf, zf, sb, G, xs, xb, out, o, col):
    """out[o, col + i] = W row i . xs token, for the 4 rows at flat q[qb + i * H] (H = K / 2 bytes a
    row) and one token at flat xs[xb] (its inputs _permuted). sf, zf: each row's group scales and
    -zero * scale, float32, row i's at flat sb + i * (K / G)."""
    a0 = _vzero()
    a1 = _vzero()
    a2 = _vzero()
    a3 = _vzero()
    b0 = _vzero()
    b1 = _vzero()
    b2 = _vzero()
    b3 = _vzero()
    groups = 2 * H // G
    per_group = G // CHUNK
    r1, r2, r3 = qb + H, qb + 2 * H, qb + 3 * H
    g1, g2, g3 = sb + groups, sb + 2 * groups, sb + 3 * groups
    for g in range(groups):
        s0, z0 = _vsplat(_at(sf, sb + g)), _vsplat(_at(zf, sb + g))
        s1, z1 = _vsplat(_at(sf, g1 + g)), _vsplat(_at(zf, g1 + g))
        s2, z2 = _vsplat(_at(sf, g2 + g)), _vsplat(_at(zf, g2 + g))
        s3, z3 = _vsplat(_at(sf, g3 + g)), _vsplat(_at(zf, g3 + g))
        t0, t1, t2, t3 = _vtable(s0, z0), _vtable(s1, z1), _vtable(s2, z2), _vtable(s3, z3)
        for c in range(g * per_group, (g + 1) * per_group):
            _prefetch(q, qb + 4 * AHEAD * H + 4 * LANES * c)  # 4 rows AHEAD blocks on, a cache line a chunk
            even = _vload(xs, xb + CHUNK * c)
            odd = _vload(xs, xb + CHUNK * c + LANES)
            low, high = _vdequantize(q, qb + LANES * c, t0, s0, z0)
            a0, b0 = _vfma(low, even, a0), _vfma(high, odd, b0)
            low, high = _vdequantize(q, r1 + LANES * c, t1, s1, z1)
            a1, b1 = _vfma(low, even, a1), _vfma(high, odd, b1)
            low, high = _vdequantize(q, r2 + LANES * c, t2, s2, z2)
            a2, b2 = _vfma(low, even, a2), _vfma(high, odd, b2)
            low, high = _vdequantize(q, r3 + LANES * c, t3, s3, z3)
            a3, b3 = _vfma(low, even, a3), _vfma(high, odd, b3)
    out[o, col] = _vsum(_vadd(a0, b0))
    out[o, col + 1] = _vsum(_vadd(a1, b1))
    out[o, col + 2] = _vsum(_vadd(a2, b2))
    out[o, col + 3] = _vsum(_vadd(a3, b3))


@njit(cache=True)
def _int4_four(q, qb, H, sf, zf, sb, G, xs, xa, xb, xc, xd, out, oa, ob, oc, od, col):
    """_int4_one for 4 tokens (flat xs offsets xa..xd, output rows oa..od; a token may repeat):
    each weight dequantized once for the 4 tokens."""
    a0 = _vzero()
    a1 = _vzero()
    a2 = _vzero()
    a3 = _vzero()
    b0 = _vzero()
    b1 = _vzero()
    b2 = _vzero()
    b3 = _vzero()
    c0 = _vzero()
    c1 = _vzero()
    c2 = _vzero()
    c3 = _vzero()
    d0 = _vzero()
    d1 = _vzero()
    d2 = _vzero()
    d3 = _vzero()
    groups = 2 * H // G
    per_group = G // CHUNK
    r1, r2, r3 = qb + H, qb + 2 * H, qb + 3 * H
    g1, g2, g3 = sb + groups, sb + 2 * groups, sb + 3 * groups
    for g in range(groups):
        s0, z0 = _vsplat(_at(sf, sb + g)), _vsplat(_at(zf, sb + g))
        s1, z1 = _vsplat(_at(sf, g1 + g)), _vsplat(_at(zf, g1 + g))
        s2, z2 = _vsplat(_at(sf, g2 + g)), _vsplat(_at(zf, g2 + g))
        s3, z3 = _vsplat(_at(sf, g3 + g)), _vsplat(_at(zf, g3 + g))
        t0, t1, t2, t3 = _vtable(s0, z0), _vtable(s1, z1), _vtable(s2, z2), _vtable(s3, z3)
        for c in range(g * per_group, (g + 1) * per_group):
            _prefetch(q, qb + 4 * AHEAD * H + 4 * LANES * c)  # 4 rows AHEAD blocks on, a cache line a chunk
            e0, o0 = _vdequantize(q, qb + LANES * c, t0, s0, z0)
            e1, o1 = _vdequantize(q, r1 + LANES * c, t1, s1, z1)
            e2, o2 = _vdequantize(q, r2 + LANES * c, t2, s2, z2)
            e3, o3 = _vdequantize(q, r3 + LANES * c, t3, s3, z3)
            even, odd = _vload(xs, xa + CHUNK * c), _vload(xs, xa + CHUNK * c + LANES)
            a0, a1 = _vfma(e0, even, _vfma(o0, odd, a0)), _vfma(e1, even, _vfma(o1, odd, a1))
            a2, a3 = _vfma(e2, even, _vfma(o2, odd, a2)), _vfma(e3, even, _vfma(o3, odd, a3))
            even, odd = _vload(xs, xb + CHUNK * c), _vload(xs, xb + CHUNK * c + LANES)
            b0, b1 = _vfma(e0, even, _vfma(o0, odd, b0)), _vfma(e1, even, _vfma(o1, odd, b1))
            b2, b3 = _vfma(e2, even, _vfma(o2, odd, b2)), _vfma(e3, even, _vfma(o3, odd, b3))
            even, odd = _vload(xs, xc + CHUNK * c), _vload(xs, xc + CHUNK * c + LANES)
            c0, c1 = _vfma(e0, even, _vfma(o0, odd, c0)), _vfma(e1, even, _vfma(o1, odd, c1))
            c2, c3 = _vfma(e2, even, _vfma(o2, odd, c2)), _vfma(e3, even, _vfma(o3, odd, c3))
            even, odd = _vload(xs, xd + CHUNK * c), _vload(xs, xd + CHUNK * c + LANES)
            d0, d1 = _vfma(e0, even, _vfma(o0, odd, d0)), _vfma(e1, even, _vfma(o1, odd, d1))
            d2, d3 = _vfma(e2, even, _vfma(o2, odd, d2)), _vfma(e3, even, _vfma(o3, odd, d3))
    out[oa, col], out[oa, col + 1], out[oa, col + 2], out[oa, col + 3] = _vsum(a0), _vsum(a1), _vsum(a2), _vsum(a3)
    out[ob, col], out[ob, col + 1], out[ob, col + 2], out[ob, col + 3] = _vsum(b0), _vsum(b1), _vsum(b2), _vsum(b3)
    out[oc, col], out[oc, col + 1], out[oc, col + 2], out[oc, col + 3] = _vsum(c0), _vsum(c1), _vsum(c2), _vsum(c3)
    out[od, col], out[od, col + 1], out[od, col + 2], out[od, col + 3] = _vsum(d0), _vsum(d1), _vsum(d2), _vsum(d3)


@njit(cache=True)
def _group_table(scale, scale_start, zero, zero_start, count, bf16, has_zero, base, missing, sf, zf):
    """sf[i] = the scale, zf[i] = -(zero - base) * scale (zero `missing` where not has_zero), float32,
    of the count consecutive groups at flat scale[scale_start] and zero[zero_start]: int4 base 0,
    missing 8; grouped int8 base 128 (its zeros are offset as q is), missing 128. Exact."""
    i = 0
    while i + LANES <= count:
        s = _vload_scales(scale, scale_start + i, bf16)
        z = _vload_bytes(zero, zero_start + i) if has_zero else _vsplat(missing)
        _vstore(sf, i, s)
        _vstore(zf, i, _vmul(_vmul(_vadd(z, _vsplat(-base)), s), _vsplat(np.float32(-1.0))))
        i += LANES
    while i < count:
        s = _scale_value(_at(scale, scale_start + i), bf16)
        z = np.float32(_at(zero, zero_start + i)) if has_zero else missing
        sf[i] = s
        zf[i] = -((z - base) * s)
        i += 1


@njit(cache=True)
def _rows_int4(m, slot, first, last, p0, count, xs, out, K, sf, zf):
    """_rows_int8 for an int4 matrix m (xs's rows _permuted; first and last multiples of 4); sf, zf:
    float32 scratch of at least (last - first) * K / G elements for the rows' group table."""
    q, scale, zero, G, bf16, has_zero = m[0], m[4], m[7], m[10], m[11], m[12]
    H, groups = K // 2, K // G
    qe = m[1] + slot * m[2]
    scales = m[5] + slot * m[6] + first * groups
    zeros = m[8] + slot * m[9] + first * groups if has_zero else 0
    base, missing = np.float32(0), np.float32(INT4_SYMMETRIC_ZERO)
    _group_table(scale, scales, zero, zeros, (last - first) * groups, bf16, has_zero, base, missing, sf, zf)
    for r in range(first, last, 4):
        qr, sr = qe + r * H, (r - first) * groups
        i = 0
        while i < count:
            pa = p0 + i
            if count - i == 1:
                _int4_one(q, qr, H, sf, zf, sr, G, xs, pa * K, out, pa, r)
                i += 1
            else:
                pa, pb, pc, pd = _tile_tokens(p0, count, i)
                _int4_four(q, qr, H, sf, zf, sr, G, xs, pa * K, pb * K, pc * K, pd * K, out, pa, pb, pc, pd, r)
                i += 4


# ---------------------------------------------------------------------------------- grouped int8 tiles


@njit(cache=True)
def _int8g_one(q, qb, K, sf, zf, sb, G, xs, xb, out, o, col):
    """out[o, col + i] = W row i . xs token, for the 4 grouped int8 rows at flat q[qb + i * K] and
    one token at flat xs[xb]. sf, zf: each row's group scales and -(zero - 128) * scale, float32,
    row i's at flat sb + i * (K / G); each weight (q + 128 - zero) * scale, exact, is formed as
    q * scale + that offset in one fused multiply-add."""
    a0 = _vzero()
    a1 = _vzero()
    a2 = _vzero()
    a3 = _vzero()
    b0 = _vzero()
    b1 = _vzero()
    b2 = _vzero()
    b3 = _vzero()
    groups = K // G
    r1, r2, r3 = qb + K, qb + 2 * K, qb + 3 * K
    g1, g2, g3 = sb + groups, sb + 2 * groups, sb + 3 * groups
    ahead = qb + 4 * AHEAD * K  # 4 rows AHEAD blocks on: the 128 bytes of 32 inputs of 4 rows per step
    for g in range(groups):
        s0, z0 = _vsplat(_at(sf, sb + g)), _vsplat(_at(zf, sb + g))
        s1, z1 = _vsplat(_at(sf, g1 + g)), _vsplat(_at(zf, g1 + g))
        s2, z2 = _vsplat(_at(sf, g2 + g)), _vsplat(_at(zf, g2 + g))
        s3, z3 = _vsplat(_at(sf, g3 + g)), _vsplat(_at(zf, g3 + g))
        for k in range(g * G, (g + 1) * G, 2 * LANES):  # G a multiple of 32
            _prefetch(q, ahead + 4 * k)
            _prefetch(q, ahead + 4 * k + 64)
            x = _vload(xs, xb + k)
            a0 = _vfma(_vfma(_vload_int8(q, qb + k), s0, z0), x, a0)
            a1 = _vfma(_vfma(_vload_int8(q, r1 + k), s1, z1), x, a1)
            a2 = _vfma(_vfma(_vload_int8(q, r2 + k), s2, z2), x, a2)
            a3 = _vfma(_vfma(_vload_int8(q, r3 + k), s3, z3), x, a3)
            x = _vload(xs, xb + k + LANES)
            b0 = _vfma(_vfma(_vload_int8(q, qb + k + LANES), s0, z0), x, b0)
            b1 = _vfma(_vfma(_vload_int8(q, r1 + k + LANES), s1, z1), x, b1)
            b2 = _vfma(_vfma(_vload_int8(q, r2 + k + LANES), s2, z2), x, b2)
            b3 = _vfma(_vfma(_vload_int8(q, r3 + k + LANES), s3, z3), x, b3)
    out[o, col] = _vsum(_vadd(a0, b0))
    out[o, col + 1] = _vsum(_vadd(a1, b1))
    out[o, col + 2] = _vsum(_vadd(a2, b2))
    out[o, col + 3] = _vsum(_vadd(a3, b3))


@njit(cache=True)
def _int8g_four(q, qb, K, sf, zf, sb, G, xs, xa, xb, xc, xd, out, oa, ob, oc, od, col):
    """_int8g_one for 4 tokens (flat xs offsets xa..xd, output rows oa..od; a token may repeat):
    each weight vector dequantized once for the 4 tokens."""
    a0 = _vzero()
    a1 = _vzero()
    a2 = _vzero()
    a3 = _vzero()
    b0 = _vzero()
    b1 = _vzero()
    b2 = _vzero()
    b3 = _vzero()
    c0 = _vzero()
    c1 = _vzero()
    c2 = _vzero()
    c3 = _vzero()
    d0 = _vzero()
    d1 = _vzero()
    d2 = _vzero()
    d3 = _vzero()
    groups = K // G
    r1, r2, r3 = qb + K, qb + 2 * K, qb + 3 * K
    g1, g2, g3 = sb + groups, sb + 2 * groups, sb + 3 * groups
    ahead = qb + 4 * AHEAD * K  # 4 rows AHEAD blocks on, a cache line of them per 16 inputs of these
    for g in range(groups):
        s0, z0 = _vsplat(_at(sf, sb + g)), _vsplat(_at(zf, sb + g))
        s1, z1 = _vsplat(_at(sf, g1 + g)), _vsplat(_at(zf, g1 + g))
        s2, z2 = _vsplat(_at(sf, g2 + g)), _vsplat(_at(zf, g2 + g))
        s3, z3 = _vsplat(_at(sf, g3 + g)), _vsplat(_at(zf, g3 + g))
        for k in range(g * G, (g + 1) * G, LANES):
            _prefetch(q, ahead + 4 * k)
            w0 = _vfma(_vload_int8(q, qb + k), s0, z0)
            w1 = _vfma(_vload_int8(q, r1 + k), s1, z1)
            w2 = _vfma(_vload_int8(q, r2 + k), s2, z2)
            w3 = _vfma(_vload_int8(q, r3 + k), s3, z3)
            x = _vload(xs, xa + k)
            a0, a1, a2, a3 = _vfma(w0, x, a0), _vfma(w1, x, a1), _vfma(w2, x, a2), _vfma(w3, x, a3)
            x = _vload(xs, xb + k)
            b0, b1, b2, b3 = _vfma(w0, x, b0), _vfma(w1, x, b1), _vfma(w2, x, b2), _vfma(w3, x, b3)
            x = _vload(xs, xc + k)
            c0, c1, c2, c3 = _vfma(w0, x, c0), _vfma(w1, x, c1), _vfma(w2, x, c2), _vfma(w3, x, c3)
            x = _vload(xs, xd + k)
            d0, d1, d2, d3 = _vfma(w0, x, d0), _vfma(w1, x, d1), _vfma(w2, x, d2), _vfma(w3, x, d3)
    out[oa, col], out[oa, col + 1], out[oa, col + 2], out[oa, col + 3] = _vsum(a0), _vsum(a1), _vsum(a2), _vsum(a3)
    out[ob, col], out[ob, col + 1], out[ob, col + 2], out[ob, col + 3] = _vsum(b0), _vsum(b1), _vsum(b2), _vsum(b3)
    out[oc, col], out[oc, col + 1], out[oc, col + 2], out[oc, col + 3] = _vsum(c0), _vsum(c1), _vsum(c2), _vsum(c3)
    out[od, col], out[od, col + 1], out[od, col + 2], out[od, col + 3] = _vsum(d0), _vsum(d1), _vsum(d2), _vsum(d3)


@njit(cache=True)
def _rows_int8g(m, slot, first, last, p0, count, xs, out, K, sf, zf):
    """_rows_int4 for a grouped int8 matrix m (xs's rows in order; first and last multiples of 4)."""
    q, scale, zero, G, bf16, has_zero = m[0], m[4], m[7], m[10], m[11], m[12]
    groups = K // G
    qe = m[1] + slot * m[2]
    scales = m[5] + slot * m[6] + first * groups
    zeros = m[8] + slot * m[9] + first * groups if has_zero else 0
    offset = np.float32(INT8_CODE_OFFSET)
    _group_table(scale, scales, zero, zeros, (last - first) * groups, bf16, has_zero, offset, offset, sf, zf)
    for r in range(first, last, 4):
        qr, sr = qe + r * K, (r - first) * groups
        i = 0
        while i < count:
            pa = p0 + i
            if count - i == 1:
                _int8g_one(q, qr, K, sf, zf, sr, G, xs, pa * K, out, pa, r)
                i += 1
            else:
                pa, pb, pc, pd = _tile_tokens(p0, count, i)
                _int8g_four(q, qr, K, sf, zf, sr, G, xs, pa * K, pb * K, pc * K, pd * K, out, pa, pb, pc, pd, r)
                i += 4


@njit(parallel=True, cache=True)
def _project(m, slots, experts, starts, counts, xs, out, N, K, workers):
    """out[pairs of e, :N] = xs[pairs of e] @ W_e^T for every expert e of `experts`, in parallel over
    (expert, block of ROWS_PER_ITEM rows), each worker a contiguous run of items (its prefetches run
    on into its next item's rows); W_e: slot slots[e] of the quantized matrix m (a _matrix tuple:
    int8, grouped int8, or int4 with xs's rows _permuted)."""
    blocks = (N + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    items = experts.shape[0] * blocks
    table = ROWS_PER_ITEM * (K // m[10]) if m[13] != INT8 else 1  # a worker's group table, reused item to item
    runs = min(workers, items)
    for worker in prange(runs):
        sf = np.empty(table, np.float32)  # [ROWS_PER_ITEM * K / G] the rows' scales
        zf = np.empty(table, np.float32)  # and -zero * scale
        for item in range(worker * items // runs, (worker + 1) * items // runs):
            e = experts[item // blocks]
            first = (item % blocks) * ROWS_PER_ITEM
            last = min(first + ROWS_PER_ITEM, N)
            if m[13] == INT4:
                _rows_int4(m, slots[e], first, last, starts[e], counts[e], xs, out, K, sf, zf)
            elif m[13] == INT8_GROUPED:
                _rows_int8g(m, slots[e], first, last, starts[e], counts[e], xs, out, K, sf, zf)
            else:
                _rows_int8(m, slots[e], first, last, starts[e], counts[e], xs, out, K)


@njit(parallel=True, cache=True)
def _dequantize_rows(m, slots, out, N, K):
    """out[u] = the float32 W [N, K] of slot slots[u] of the quantized matrix m (a _matrix tuple),
    in parallel over (slot, row), 16 lanes at a time: (code - zero) * scale, exactly dequantize()'s
    values (each product exact, or int8's q * scale rounded once as there)."""
    for item in prange(slots.shape[0] * N):
        u, n = item // N, item % N
        slot = slots[u]
        if m[13] == INT4:  # int4: byte j holds inputs 2j (low nibble) and 2j + 1
            q, scale, zero, G, bf16, has_zero = m[0], m[4], m[7], m[10], m[11], m[12]
            H, groups = K // 2, K // G
            qr = m[1] + slot * m[2] + n * H
            sr = m[5] + slot * m[6] + n * groups
            zr = m[8] + slot * m[9] + n * groups
            row = (u * N + n) * K  # out[u, n, 0], flat
            for g in range(groups):  # each weight code * s - z * s in one rounding: (code - z) * s, exact
                s = _scale_value(_at(scale, sr + g), bf16)
                z = np.float32(_at(zero, zr + g)) if has_zero else np.float32(INT4_SYMMETRIC_ZERO)
                sv, offset = _vsplat(s), _vsplat(-(z * s))
                table = _vtable(sv, offset)
                for c in range(g * G // CHUNK, (g + 1) * G // CHUNK):  # G a multiple of 32
                    even, odd = _vdequantize(q, qr + LANES * c, table, sv, offset)
                    _vstore_interleaved(out, row + CHUNK * c, even, odd)
        elif m[13] == INT8_GROUPED:  # (q + 128 - zero) * the group's scale
            q, scale, zero, G, bf16, has_zero = m[0], m[4], m[7], m[10], m[11], m[12]
            groups = K // G
            qr = m[1] + slot * m[2] + n * K
            sr = m[5] + slot * m[6] + n * groups
            zr = m[8] + slot * m[9] + n * groups
            row = (u * N + n) * K  # out[u, n, 0], flat
            for g in range(groups):
                s = _scale_value(_at(scale, sr + g), bf16)
                z = np.float32(_at(zero, zr + g)) - np.float32(INT8_CODE_OFFSET) if has_zero else np.float32(0)
                sv, shift = _vsplat(s), _vsplat(-z)
                for k in range(g * G, (g + 1) * G, LANES):  # G a multiple of 32
                    _vstore(out, row + k, _vmul(_vadd(_vload_int8(q, qr + k), shift), sv))
        else:  # int8: q * the row's scale
            s = _at(m[3], m[5] + slot * m[6] + n)
            qr = m[1] + slot * m[2] + n * K
            row = (u * N + n) * K
            sv = _vsplat(s)
            k = 0
            while k + LANES <= K:
                _vstore(out, row + k, _vmul(_vload_int8(m[0], qr + k), sv))
                k += LANES
            while k < K:  # K need not be a multiple of 16 here
                out[u, n, k] = np.float32(_int8_at(m[0], qr + k)) * s
                k += 1


def dequantize_slots(m: QuantizedMatrix, slots: torch.Tensor) -> torch.Tensor:
    """m [S, N, K] (plain stacks or record views) -> float32 [U, N, K]: the matrices of the U slots
    `slots` (int64), dequantized as quantize.dequantize does, bit for bit, in parallel (the
    prefill path: a grouped float matmul over them follows)."""
    S, N, K = m.shape
    slots = slots.to(torch.int64).contiguous()
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= S):
        raise ValueError(f"dequantize_slots: expected slots in 0..{S - 1}, found {slots.tolist()}")
    out = np.empty((slots.shape[0], N, K), np.float32)
    _dequantize_rows(_matrix("matrix", m, N, K), slots.numpy(), out, N, K)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------- the layer


@njit(cache=True)
def _aligned_rows(rows, cols):
    """An empty float32 [rows, cols] whose data starts on a 64-byte boundary (a cache line: the
    16-lane loads of a row whose length is a multiple of 16 never straddle two)."""
    buffer = np.empty(rows * cols + LANES, np.float32)
    skip = (LANES - buffer.ctypes.data // 4 % LANES) % LANES
    return buffer[skip : skip + rows * cols].reshape(rows, cols)


@njit(inline="always")
def _permuted(k, permute):
    """Where input k sits in a _permuted row: within each chunk of 32, the even inputs first."""
    if not permute:
        return k
    within = k % CHUNK
    return k - within + within // 2 + (within % 2) * LANES


@njit(cache=True)
def _source_experts(counts, second_slots, second):
    """The active experts (counts > 0), ascending, that sit in the second buffer (second True:
    second_slots[e] >= 0) or in the first."""
    n = 0
    for e in range(counts.shape[0]):
        n += counts[e] > 0 and (second_slots[e] >= 0) == second
    experts = np.empty(n, np.int64)
    n = 0
    for e in range(counts.shape[0]):
        if counts[e] > 0 and (second_slots[e] >= 0) == second:
            experts[n] = e
            n += 1
    return experts


@njit(fastmath=FAST, cache=True, parallel=CALLS_PARALLEL)
def _moe_layer(x, ids, weights, slots, second_slots, m13, m2, m13b, m2b, perm, permb, has_perm, permute13, permute2,
               F, activation, alpha, limit, S, H, workers, out):  # fmt: skip
    """x: [T, D] float32; ids, weights: [T, K] int64, float32; slots: [E] int64, each expert's slot;
    second_slots: [E] int64, each expert's record in the second buffers (>= 0: read from there
    instead); m13, m2 (the slots) and m13b, m2b (the second buffers): the quantized w13 [S, 2F, D]
    and w2 [S, D, F] as _matrix tuples, permute13 and permute2 where they are int4 (their inputs
    _permuted); perm, permb: (int32 elements, slot 0's offset, slot stride) of each slot's and
    record's input order [D] when has_perm (act order: w13 reads x[perm]); out: [T, D] float32,
    each token's weighted sum. Returns False, computing nothing, where a routed expert is not in
    0..E-1 or its slot not in 0..S-1 (its record in 0..H-1)."""
    T, K = ids.shape
    D = x.shape[1]
    E = slots.shape[0]
    P = T * K
    for p in range(P):
        e = ids[p // K, p % K]
        if e < 0 or e >= E:
            return False
        if second_slots[e] >= 0:
            if second_slots[e] >= H:
                return False
        elif slots[e] < 0 or slots[e] >= S:
            return False
    # the (token, k) pairs sorted by expert, stably: expert e's pairs are rows starts[e] : + counts[e]
    counts = np.zeros(E, np.int64)
    for p in range(P):
        counts[ids[p // K, p % K]] += 1
    starts = np.zeros(E, np.int64)
    for e in range(1, E):
        starts[e] = starts[e - 1] + counts[e - 1]
    fill = starts.copy()
    position = np.empty(P, np.int64)  # [P] each pair's row in expert order
    xs = _aligned_rows(P, D)  # [P, D] the pairs' tokens, in expert order (_permuted for int4; x[perm])
    for p in range(P):
        e = ids[p // K, p % K]
        position[p] = fill[e]
        if has_perm:
            order, first, stride = perm if second_slots[e] < 0 else permb
            base = first + stride * (slots[e] if second_slots[e] < 0 else second_slots[e])
            for d in range(D):
                xs[fill[e], _permuted(d, permute13)] = x[p // K, order[base + d]]
        else:
            for d in range(D):
                xs[fill[e], _permuted(d, permute13)] = x[p // K, d]
        fill[e] += 1
    in_slots = _source_experts(counts, second_slots, False)  # [A] active experts, by where they are read
    in_second = _source_experts(counts, second_slots, True)
    gate_up = np.empty((P, 2 * F), np.float32)  # [P, 2F]
    _project(m13, slots, in_slots, starts, counts, xs, gate_up, 2 * F, D, workers)
    if in_second.shape[0]:
        _project(m13b, second_slots, in_second, starts, counts, xs, gate_up, 2 * F, D, workers)
    act = _aligned_rows(P, F)  # [P, F] (_permuted for an int4 w2)
    for q in range(P):
        for f in range(F):
            gate, up = gate_up[q, f], gate_up[q, F + f]
            if activation == 0:  # silu(gate) * up
                value = gate / (np.float32(1.0) + np.exp(-gate)) * up
            else:  # (clamp(up) + 1) * (min(gate, limit) * sigmoid(alpha * min(gate, limit)))
                gate = min(gate, limit)
                up = min(max(up, -limit), limit)
                value = (up + np.float32(1.0)) * (gate / (np.float32(1.0) + np.exp(-(gate * alpha))))
            act[q, _permuted(f, permute2)] = value
    y = np.empty((P, D), np.float32)  # [P, D]
    _project(m2, slots, in_slots, starts, counts, act, y, D, F, workers)
    if in_second.shape[0]:
        _project(m2b, second_slots, in_second, starts, counts, act, y, D, F, workers)
    for t in range(T):
        for d in range(D):
            out[t, d] = 0.0
        for k in range(K):
            q = position[t * K + k]
            w = weights[t, k]
            for d in range(D):
                out[t, d] += y[q, d] * w
    return True


# ---------------------------------------------------------------------------------- launcher


_NUMPY = {torch.uint8: np.uint8, torch.int8: np.uint8, torch.float32: np.float32}  # int8 as its bytes
_NUMPY |= {torch.float16: np.uint16, torch.bfloat16: np.uint16}  # 16-bit floats as their bits
_NUMPY |= {torch.int32: np.int32}  # input orders


def _elements(t: torch.Tensor) -> np.ndarray:
    """The elements of t's whole storage as a flat numpy array over the same memory (int8 as uint8,
    16-bit floats as their uint16 bits), valid while t lives. ctypes: a third of torch's
    set_() + numpy() cost, which a decode step pays for six arrays a layer."""
    storage, size = t.untyped_storage(), t.element_size()
    count = storage.nbytes() // size
    if count == 0:
        return np.zeros(0, _NUMPY[t.dtype])
    return np.frombuffer((ctypes.c_char * (count * size)).from_address(storage.data_ptr()), _NUMPY[t.dtype])


def _slot_blocks(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> tuple[np.ndarray, int, int]:
    """t: [S, *shape] slot-indexed -> (its storage's elements, element offset of slot 0, elements
    between slots), after checking that every slot's block is contiguous."""
    if tuple(t.shape[1:]) != shape or not t[0].is_contiguous():
        raise ValueError(
            f"host quantized experts {name}: expected [S, {', '.join(map(str, shape))}] with each slot's block "
            f"contiguous, found {list(t.shape)} with strides {list(t.stride())}"
        )
    return _elements(t), t.storage_offset(), t.stride(0)


_UNUSED = {dtype: np.zeros(1, dtype) for dtype in (np.uint8, np.uint16, np.float32)}  # arrays a format lacks


def _matrix(name: str, m: QuantizedMatrix, N: int, K: int) -> tuple:
    """m [S, N, K] -> the tuple the kernels read, one type for every layout: (q bytes, offset,
    stride, float32 scales, 16-bit scale bits, offset, stride, zero, offset, stride, group size,
    bf16 scales, has zero, layout code INT8 / INT4 / INT8_GROUPED), each array as its storage's
    elements, with its slot 0's offset and its slot stride; a layout's missing arrays stand-ins
    never read."""
    if m.q.dim() != 3 or tuple(m.shape[1:]) != (N, K):
        raise ValueError(f"host quantized experts {name}: expected [S, {N}, {K}], found {list(m.shape)}")
    if m.format == "int8" and not m.grouped_int8:
        q, q_offset, q_stride = _slot_blocks(f"{name} q", m.q, (N, K))
        scale = _slot_blocks(f"{name} scale", m.scale, (N,))
        return (q, q_offset, q_stride, scale[0], _UNUSED[np.uint16], *scale[1:], _UNUSED[np.uint8], 0, 0,
                0, False, False, INT8)  # fmt: skip
    kind = "int4" if m.format == "int4" else "grouped int8"
    if N % 4 or K % CHUNK:  # G | K (checked by QuantizedMatrix) makes both so for every shape a model has
        raise ValueError(
            f"host quantized experts {name}: expected {kind} [S, N, K] with 4 | N and 32 | K, found {N}, {K}"
        )
    groups = K // m.group_size
    q = _slot_blocks(f"{name} q", m.q, (N, K // 2 if m.format == "int4" else K))
    scale = _slot_blocks(f"{name} scale", m.scale, (N, groups))
    zero = (_UNUSED[np.uint8], 0, 0) if m.zero is None else _slot_blocks(f"{name} zero", m.zero, (N, groups))
    return (*q, _UNUSED[np.float32], *scale, *zero, m.group_size, m.scale.dtype == torch.bfloat16, m.zero is not None,
            INT4 if m.format == "int4" else INT8_GROUPED)  # fmt: skip


# id(m), N, K -> _matrix(m, N, K), kept while m lives. A QuantizedMatrix is frozen and owns its
# tensors, so the views stay valid as long as it does; the runtime passes the same few matrices
# every step (a resident stack, the pool's slot and host-tier record views), and building their
# views took about a fifth of a decode-sized call.
_VIEWS: dict[tuple[int, int, int], tuple] = {}


def _views(name: str, m: QuantizedMatrix, N: int, K: int) -> tuple:
    """_matrix(name, m, N, K), built once per matrix and shape."""
    key = (id(m), N, K)
    views = _VIEWS.get(key)
    if views is None:
        views = _matrix(name, m, N, K)
        _VIEWS[key] = views
        weakref.finalize(m, _VIEWS.pop, key, None)  # before id(m) can name another matrix
    return views


def _layout(m: QuantizedMatrix) -> str:
    """int8, grouped int8 or int4: which tiles read m."""
    return "grouped int8" if m.grouped_int8 else m.format


def applies(x: torch.Tensor) -> bool:
    """Whether these kernels run x: a CPU float32 step of decode size."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= MAX_TOKENS


def _input_order(name: str, perm: torch.Tensor | None, slots: int, D: int) -> tuple:
    """perm [S, D] int32 (each slot's input order) -> (its storage's elements, slot 0's offset, slot
    stride); None -> a stand-in never read."""
    if perm is None:
        return _NO_ORDER
    if perm.dtype != torch.int32 or perm.shape[0] != slots:
        raise ValueError(
            f"host quantized experts {name}: expected int32 [{slots}, {D}], found {perm.dtype} {list(perm.shape)}"
        )
    return _slot_blocks(name, perm, (D,))


_NO_ORDER = (np.zeros(1, np.int32), 0, 0)


def host_quant_moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: QuantizedMatrix,
    w2: QuantizedMatrix,
    expert_slots: torch.Tensor,
    *,
    activation: ExpertActivation = SILU,
    input_perm: torch.Tensor | None = None,
    second: SecondBuffers | None = None,
) -> torch.Tensor:
    """quantized_moe_experts_reference's contract (quantize.py), on the CPU: x [T, D] float32,
    topk_ids [T, K] int64, topk_weights [T, K]; w13 [S, 2F, D], w2 [S, D, F] quantized, int8, grouped
    int8 or int4 each (every slot's block of each array contiguous: plain stacks or views into records);
    expert_slots [E] int64 -> [T, D] float32. input_perm: [S, D] int32, each slot's w13 input order
    (act-order records: w13 is multiplied with x[:, perm]); None: identity. second: experts read
    from a second buffer (the host tier's records, laid out as the slots, input_perm with them)
    instead of the slots (those with second.slots >= 0), computed exactly as from a slot."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"host quantized experts: expected x float32 [T, D], found {x.dtype} {list(x.shape)}")
    T, D = x.shape
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(
            f"host quantized experts: expected topk_ids and topk_weights [{T}, K], found {list(topk_ids.shape)} "
            f"and {list(topk_weights.shape)}"
        )
    F = w2.shape[-1]
    m13 = _views("w13", w13, 2 * F, D)
    m2 = _views("w2", w2, D, F)
    S = w13.q.shape[0]
    if w2.q.shape[0] != S:
        raise ValueError(
            f"host quantized experts: expected w13 and w2 of the same S slots, found {S} and {w2.q.shape[0]}"
        )
    perm = _input_order("input_perm", input_perm, S, D)
    E = expert_slots.shape[0]
    if second is None:
        second_slots, m13b, m2b, permb, H = np.full(E, -1, np.int64), m13, m2, perm, 0
    else:
        if not (isinstance(second.w13, QuantizedMatrix) and isinstance(second.w2, QuantizedMatrix)):
            raise ValueError("host quantized experts: expected the second buffers quantized as the slots are")
        theirs, ours = (_layout(second.w13), _layout(second.w2)), (_layout(w13), _layout(w2))
        if theirs != ours or (second.input_perm is None) != (input_perm is None):
            raise ValueError(
                f"host quantized experts: expected the second buffers in the slots' formats {ours[0]} / {ours[1]} "
                f"(input order: {input_perm is not None}), found {theirs[0]} / {theirs[1]} "
                f"(input order: {second.input_perm is not None})"
            )
        H = second.w13.q.shape[0]
        second_slots = second.slots.to(torch.int64).contiguous().numpy()
        m13b, m2b = _views("second w13", second.w13, 2 * F, D), _views("second w2", second.w2, D, F)
        permb = _input_order("second input_perm", second.input_perm, H, D)
    out = np.empty((T, D), np.float32)
    routed = _moe_layer(
        x.contiguous().numpy(), topk_ids.to(torch.int64).contiguous().numpy(),
        topk_weights.to(torch.float32).contiguous().numpy(), expert_slots.to(torch.int64).contiguous().numpy(),
        second_slots, m13, m2, m13b, m2b, perm, permb, input_perm is not None, w13.format == "int4",
        w2.format == "int4", F, ACTIVATIONS[activation.kind], np.float32(activation.alpha),
        np.float32(activation.limit), S, H, numba.get_num_threads(), out,
    )  # fmt: skip
    if not routed:  # the kernels index raw memory: nothing ran; say what was out of range
        slots = expert_slots[topk_ids.clamp(0, E - 1)]
        records = "" if second is None else f" (or records 0..{H - 1} of the second buffers)"
        raise ValueError(
            f"host quantized experts: expected routed experts in 0..{E - 1} in slots 0..{S - 1}{records}, found "
            f"experts {int(topk_ids.min())}..{int(topk_ids.max())} in slots {int(slots.min())}..{int(slots.max())}"
        )
    return torch.from_numpy(out)
