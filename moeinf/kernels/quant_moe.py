"""Fused gated-MLP experts on int8 / grouped int8 / int4 weights (w8a16, w4a16) read through a slot
table.

The pipeline of moe.py's fused_moe, with each weight tile dequantized in registers inside the
reduction loop (a float copy of a weight matrix is never made):

    align_by_expert       topk_ids [T, K] -> sorted pair ids [P], a slot per row block       (moe.py)
    gate_up_act (quant)   act[p] = activation(x[t] @ gate^T, x[t] @ up^T)                     act: [T*K, F]
    down_weighted (quant) y[p] = topk_weight[p] * (act[p] @ w2^T), float32                    y:   [T*K, D]
    combine_topk          out[t] = y[t*K + 0] + ... + y[t*K + K-1], float32 sums, k order    (moe.py)

with p = t * K + k; the contract of quantize.py's quantized_moe_experts_reference. The weights are
QuantizedMatrix stacks in quantize.py's layout (W [N, K] per slot: N outputs, K inputs):

    int8  q int8 [S, N, K], scale float32 [S, N]: W = q * scale. The tile of q is converted to the
          compute dtype (|q| <= 127 is exact in bfloat16 and float16), multiplied into a float32
          accumulator over the whole reduction, and the row's scale applied once after the loop.
    int4  q uint8 [S, N, K/2] (byte j: input 2j in its low nibble, 2j + 1 in its high one), scale
          float16 / bfloat16 [S, N, K/G], zero uint8 [S, N, K/G] or None (zero 8). A reduction
          step of BLOCK_K inputs lies inside one group: it reads BLOCK_K / 2 bytes per output
          column, splits them into the even inputs' codes (low nibbles) and the odd inputs' (high),
          dequantizes each, (code - zero) * scale (exact in float32), rounds it to the compute
          dtype, and takes two dots into the float32 accumulator: the x tile's even columns (x is
          loaded as one contiguous tile and split) with the low codes, its odd columns with the high:
              acc[m, n] += sum over the step's j of x[m, 2j] * W[n, 2j] + x[m, 2j+1] * W[n, 2j+1]
          BLOCK_K is the config's block_k cut to the largest power of two dividing G (G is a
          multiple of 32, so that is at least 32) and raised to 32 (each dot needs 16 inputs). K is a
          multiple of G, so int4 steps need no masks along the reduction. (A per-group float32
          partial scaled after the dots would skip the rounding, but holds a third [BLOCK_M,
          BLOCK_N] tile in registers: sm_90 builds of the gate/up kernel spilled at 64 x 128 tiles.)
    int8 grouped  q int8 [S, N, K], scale float16 / bfloat16 [S, N, K/G], zero uint8 [S, N, K/G]
          (offset by 128 as q is) or None (128): int4's structure without the nibbles. A step of
          BLOCK_K inputs (int4's BLOCK_K rule: inside one group) loads its [BLOCK_K, BLOCK_N] codes,
          dequantizes them, (q + 128 - zero) * scale (exact in float32: 9 x 11 bits), rounds them
          to the compute dtype and takes one dot into the float32 accumulator.

Act order (GPTQ's desc_act): input_perm [S, D] gives each slot's w13 input order, w13 packing
W13[:, perm] so that its packed input j multiplies x[t, perm[j]]; the gate/up kernel then loads x's
columns through the slot's permutation (a gather from the token rows) instead of in order. w2's
inputs are in order.

w13 (gate rows then up rows, [S, 2F, D]) and w2 ([S, D, F]) may have different formats. Every array
is a strided view: a slot stride of any size (the offload pool packs a slot's arrays into one
aligned record), row and element strides as they are; the kernels take all strides and compute
slot offsets in int64, so no array is copied.

Numerics: the accumulators are float32; act is stored in x's dtype (as fused_moe does) and y in
float32; combine_topk sums a token's K rows in k order, so results are bitwise reproducible. The
reference multiplies x (float32) with the float32 dequantized weights: this differs from it by the
summation order, by int8's scale applied after the sum instead of to each weight, by the rounding
of int4's dequantized weights to x's dtype (none for float32 x, nor for bfloat16 x under the
interpreter, which multiplies in float32), and by the rounding of act (and of the output) to x's
dtype: for 16-bit x, fused_moe's errors on the weights dequantized to x's dtype.

Hybrid execution: with host_share, rows of experts whose slot is HOST_SLOT (-2) are zeros, as in
fused_moe: out is the device's share and the caller adds the host's.

Block sizes: one BlockConfig for both GEMMs, as fused_moe; looked up (config=None) in the tuned
files of block_configs.py under the format key of the pair (format_key: "int8", "int8g" for
grouped int8, "int4", or "int8_int4" for int8 w13 and int4 w2), which bench/tune_moe.py --format writes; else the heuristic.
Under the interpreter, bfloat16 tiles are multiplied in float32 (UPCAST, as in moe.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeinf.kernels.block_configs import BlockConfig, device_name, moe_block_config
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.moe import (
    _ACTIVATION_CODES,
    _DTYPES,
    HOST_SLOT,
    ExpertBlocks,
    _activation,
    _block_ids,
    _dot_precision,
    _expect,
    _expect_activation,
    _expect_matrix,
    _resolve_upcast,
    align_by_expert,
    check_routing,
    combine_topk,
)
from moeinf.kernels.quantize import INT4_SYMMETRIC_ZERO, INT8_CODE_OFFSET, QuantizedMatrix

INT8, INT4, INT8_GROUPED = 0, 1, 2  # the FORMAT constexprs
INT4_MIN_BLOCK_K = 32  # two dots of BLOCK_K / 2 inputs each; tl.dot needs 16 (grouped int8 steps too)


# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _int8_step(a, q_ptrs, mask, acc, DOT_PRECISION: tl.constexpr):
    # a: [BLOCK_M, BLOCK_K] rows in the compute dtype; q_ptrs: [BLOCK_K, BLOCK_N] int8 codes
    w = tl.load(q_ptrs, mask=mask, other=0).to(a.dtype)  # exact: |q| <= 127
    return tl.dot(a, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _int4_step(
    a_even,
    a_odd,
    q_ptrs,
    scale_ptrs,
    zero_ptrs,
    col_ok,
    acc,
    HAS_ZERO: tl.constexpr,
    SYMMETRIC_ZERO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # a_even, a_odd: [BLOCK_M, BLOCK_K / 2] the step's even and odd input columns, compute dtype;
    # q_ptrs: [BLOCK_K / 2, BLOCK_N] bytes; scale_ptrs, zero_ptrs: [BLOCK_N] the step's group
    packed = tl.load(q_ptrs, mask=col_ok[None, :], other=0).to(tl.int32)  # [BLOCK_K / 2, BLOCK_N]
    if HAS_ZERO:
        zero = tl.load(zero_ptrs, mask=col_ok, other=0).to(tl.int32)[None, :]
    else:
        zero = SYMMETRIC_ZERO
    scale = tl.load(scale_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # (code - zero) * scale is exact in float32, then rounded once to the compute dtype; folding the
    # scale in here (not into a per-group partial sum) keeps one accumulator per GEMM in registers
    low = (((packed & 15) - zero).to(tl.float32) * scale).to(a_even.dtype)  # [BLOCK_K / 2, BLOCK_N] inputs 2j
    high = (((packed >> 4) - zero).to(tl.float32) * scale).to(a_even.dtype)  # inputs 2j + 1
    acc = tl.dot(a_even, low, acc, input_precision=DOT_PRECISION)
    return tl.dot(a_odd, high, acc, input_precision=DOT_PRECISION)


@triton.jit
def _int8_group_step(
    a,
    q_ptrs,
    scale_ptrs,
    zero_ptrs,
    col_ok,
    acc,
    HAS_ZERO: tl.constexpr,
    CODE_OFFSET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # a: [BLOCK_M, BLOCK_K] the step's input columns, compute dtype; q_ptrs: [BLOCK_K, BLOCK_N] int8
    # codes (the step lies in one group); scale_ptrs, zero_ptrs: [BLOCK_N] the step's group
    q = tl.load(q_ptrs, mask=col_ok[None, :], other=0).to(tl.int32)  # [BLOCK_K, BLOCK_N]
    if HAS_ZERO:
        zero = tl.load(zero_ptrs, mask=col_ok, other=0).to(tl.int32)[None, :] - CODE_OFFSET  # zero - 128
    else:
        zero = 0
    scale = tl.load(scale_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w = ((q - zero).to(tl.float32) * scale).to(a.dtype)  # exact in float32, rounded once to the compute dtype
    return tl.dot(a, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _input_columns(perm_ptrs, positions, ok, HAS_PERM: tl.constexpr):
    # positions: [BLOCK] of the step's packed inputs -> the columns of x they multiply: input_perm's
    # entries of this slot (act order), or the positions themselves
    cols = positions
    if HAS_PERM:
        cols = tl.load(perm_ptrs, mask=ok, other=0).to(tl.int64)
    return cols


@triton.jit
def _quant_gate_up_act_kernel(
    x_ptr,  # x: [T, D]
    q_ptr,  # w13 q: int8 [S, 2F, D] or uint8 [S, 2F, D/2], gate rows then up rows
    scale_ptr,  # w13 scale: float32 [S, 2F] or float16 / bfloat16 [S, 2F, D/G]
    zero_ptr,  # w13 zero: uint8 [S, 2F, D/G]; unread for int8 and symmetric int4 / grouped int8
    perm_ptr,  # input_perm: [S, D] int32 / int64, w13's input order; unread without it
    act_ptr,  # act: [T*K, F]
    pairs_ptr,  # sorted_pairs: [P] int32
    block_slots_ptr,  # block_slots: [P / BLOCK_M] int32, -1 for blocks of padding only
    num_pairs,
    num_blocks_m,
    ffn,
    hidden,
    alpha,  # clamped swiglu: the sigmoid's gain (unused by silu)
    limit,  # clamped swiglu: the clamp bound (unused by silu)
    stride_xt,
    stride_xd,
    stride_qs,
    stride_qn,
    stride_qk,
    stride_ss,
    stride_sn,
    stride_sg,
    stride_zs,
    stride_zn,
    stride_zg,
    stride_ps,
    stride_pd,
    stride_ap,
    stride_af,
    TOP_K: tl.constexpr,
    FORMAT: tl.constexpr,  # 0: int8, 1: int4, 2: grouped int8
    GROUP: tl.constexpr,  # int4, grouped int8: inputs per group G (unused by int8)
    HAS_ZERO: tl.constexpr,
    SYMMETRIC_ZERO: tl.constexpr,
    CODE_OFFSET: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0: silu, 1: clamped swiglu
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _block_ids(tl.program_id(0), num_blocks_m, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    slot = tl.load(block_slots_ptr + pid_m).to(tl.int64)
    if slot < 0:
        # padding blocks, and experts without a slot: the down kernel owns the rows read later
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + offs_m).to(tl.int64)
    row_ok = pairs < num_pairs
    tokens = pairs // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < ffn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q_slot = q_ptr + slot * stride_qs
    x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1] the pairs' tokens
    perm_slot = perm_ptr + slot * stride_ps
    if FORMAT == 0:
        offs_k = tl.arange(0, BLOCK_K)
        perm_ptrs = perm_slot + offs_k * stride_pd  # [BLOCK_K]
        gate_ptrs = q_slot + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk  # [BLOCK_K, BLOCK_N]
        up_ptrs = gate_ptrs + ffn * stride_qn
        for k in range(tl.cdiv(hidden, BLOCK_K)):
            k_ok = offs_k < hidden - k * BLOCK_K
            cols = _input_columns(perm_ptrs, k * BLOCK_K + offs_k, k_ok, HAS_PERM)  # [BLOCK_K]
            xs = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                # the interpreter's bfloat16 arithmetic is wrong; casts are right, so it multiplies fp32
                xs = xs.to(tl.float32)
            w_ok = k_ok[:, None] & col_ok[None, :]
            acc_gate = _int8_step(xs, gate_ptrs, w_ok, acc_gate, DOT_PRECISION)
            acc_up = _int8_step(xs, up_ptrs, w_ok, acc_up, DOT_PRECISION)
            perm_ptrs += BLOCK_K * stride_pd
            gate_ptrs += BLOCK_K * stride_qk
            up_ptrs += BLOCK_K * stride_qk
        gate_scale_ptrs = scale_ptr + slot * stride_ss + offs_n * stride_sn  # [BLOCK_N] per output channel
        acc_gate *= tl.load(gate_scale_ptrs, mask=col_ok, other=0.0)[None, :]
        acc_up *= tl.load(gate_scale_ptrs + ffn * stride_sn, mask=col_ok, other=0.0)[None, :]
    elif FORMAT == 2:
        offs_k = tl.arange(0, BLOCK_K)
        perm_ptrs = perm_slot + offs_k * stride_pd  # [BLOCK_K]
        gate_ptrs = q_slot + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk  # [BLOCK_K, BLOCK_N]
        up_ptrs = gate_ptrs + ffn * stride_qn
        gate_scale_ptrs = scale_ptr + slot * stride_ss + offs_n * stride_sn  # [BLOCK_N], group 0
        up_scale_ptrs = gate_scale_ptrs + ffn * stride_sn
        gate_zero_ptrs = zero_ptr + slot * stride_zs + offs_n * stride_zn  # [BLOCK_N]; unread without zeros
        up_zero_ptrs = gate_zero_ptrs + ffn * stride_zn
        for k in range(hidden // BLOCK_K):
            group = (k * BLOCK_K) // GROUP  # BLOCK_K divides GROUP: the step is in one group
            cols = _input_columns(perm_ptrs, k * BLOCK_K + offs_k, offs_k < BLOCK_K, HAS_PERM)  # no partial step
            xs = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)  # [BM, BK]
            if UPCAST:
                xs = xs.to(tl.float32)
            acc_gate = _int8_group_step(
                xs, gate_ptrs, gate_scale_ptrs + group * stride_sg, gate_zero_ptrs + group * stride_zg, col_ok,
                acc_gate, HAS_ZERO, CODE_OFFSET, DOT_PRECISION,
            )  # fmt: skip
            acc_up = _int8_group_step(
                xs, up_ptrs, up_scale_ptrs + group * stride_sg, up_zero_ptrs + group * stride_zg, col_ok,
                acc_up, HAS_ZERO, CODE_OFFSET, DOT_PRECISION,
            )  # fmt: skip
            perm_ptrs += BLOCK_K * stride_pd
            gate_ptrs += BLOCK_K * stride_qk
            up_ptrs += BLOCK_K * stride_qk
    else:
        offs_k = tl.arange(0, BLOCK_K)
        offs_h = tl.arange(0, BLOCK_K // 2)  # byte j of the step: inputs 2j and 2j + 1
        perm_ptrs = perm_slot + offs_k * stride_pd  # [BLOCK_K]
        gate_ptrs = q_slot + offs_n[None, :] * stride_qn + offs_h[:, None] * stride_qk  # [BK/2, BN] bytes
        up_ptrs = gate_ptrs + ffn * stride_qn
        gate_scale_ptrs = scale_ptr + slot * stride_ss + offs_n * stride_sn  # [BLOCK_N], group 0
        up_scale_ptrs = gate_scale_ptrs + ffn * stride_sn
        gate_zero_ptrs = zero_ptr + slot * stride_zs + offs_n * stride_zn  # [BLOCK_N]; unread without zeros
        up_zero_ptrs = gate_zero_ptrs + ffn * stride_zn
        for k in range(hidden // BLOCK_K):
            group = (k * BLOCK_K) // GROUP  # BLOCK_K divides GROUP: the step is in one group
            cols = _input_columns(perm_ptrs, k * BLOCK_K + offs_k, offs_k < BLOCK_K, HAS_PERM)  # no partial step
            xs = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)  # [BM, BK]
            x_even, x_odd = tl.split(tl.reshape(xs, (BLOCK_M, BLOCK_K // 2, 2)))  # [BM, BK/2] inputs 2j, 2j + 1
            if UPCAST:
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            acc_gate = _int4_step(
                x_even, x_odd, gate_ptrs, gate_scale_ptrs + group * stride_sg, gate_zero_ptrs + group * stride_zg,
                col_ok, acc_gate, HAS_ZERO, SYMMETRIC_ZERO, DOT_PRECISION,
            )  # fmt: skip
            acc_up = _int4_step(
                x_even, x_odd, up_ptrs, up_scale_ptrs + group * stride_sg, up_zero_ptrs + group * stride_zg,
                col_ok, acc_up, HAS_ZERO, SYMMETRIC_ZERO, DOT_PRECISION,
            )  # fmt: skip
            perm_ptrs += BLOCK_K * stride_pd
            gate_ptrs += (BLOCK_K // 2) * stride_qk
            up_ptrs += (BLOCK_K // 2) * stride_qk
    act = _activation(acc_gate, acc_up, alpha, limit, ACTIVATION)
    act_ptrs = act_ptr + pairs[:, None] * stride_ap + offs_n[None, :] * stride_af
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _quant_down_weighted_kernel(
    act_ptr,  # act: [T*K, F]
    q_ptr,  # w2 q: int8 [S, D, F] or uint8 [S, D, F/2]
    scale_ptr,  # w2 scale: float32 [S, D] or float16 / bfloat16 [S, D, F/G]
    zero_ptr,  # w2 zero: uint8 [S, D, F/G]; None for int8 and symmetric int4
    weights_ptr,  # topk_weights: [T, K] float32
    y_ptr,  # y: [T*K, D] float32
    pairs_ptr,  # sorted_pairs: [P] int32
    block_slots_ptr,  # block_slots: [P / BLOCK_M] int32
    num_pairs,
    num_blocks_m,
    hidden,
    ffn,
    stride_ap,
    stride_af,
    stride_qs,
    stride_qn,
    stride_qk,
    stride_ss,
    stride_sn,
    stride_sg,
    stride_zs,
    stride_zn,
    stride_zg,
    stride_rt,
    stride_rk,
    stride_yp,
    stride_yd,
    TOP_K: tl.constexpr,
    FORMAT: tl.constexpr,  # 0: int8, 1: int4, 2: grouped int8
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    SYMMETRIC_ZERO: tl.constexpr,
    CODE_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HOST_SHARE: tl.constexpr,  # HOST_SLOT experts are the host's: their rows are zeros here
    HOST_SLOT_ID: tl.constexpr,
):
    pid_m, pid_n = _block_ids(tl.program_id(0), num_blocks_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    slot = tl.load(block_slots_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + offs_m).to(tl.int64)
    row_ok = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden
    y_ptrs = y_ptr + pairs[:, None] * stride_yp + offs_n[None, :] * stride_yd
    if slot < 0:
        # padding blocks store nothing; rows of a routed expert without a slot (a caller bug the
        # launcher cannot see without a device sync) become NaN, those the host computes zeros
        if HOST_SHARE:
            fill = tl.where(slot == HOST_SLOT_ID, 0.0, float("nan"))
        else:
            fill = float("nan")
        rows = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + fill
        tl.store(y_ptrs, rows, mask=row_ok[:, None] & col_ok[None, :])
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q_slot = q_ptr + slot * stride_qs
    if FORMAT == 0:
        offs_k = tl.arange(0, BLOCK_K)
        act_ptrs = act_ptr + pairs[:, None] * stride_ap + offs_k[None, :] * stride_af  # [BLOCK_M, BLOCK_K]
        w_ptrs = q_slot + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk  # [BLOCK_K, BLOCK_N]
        for k in range(tl.cdiv(ffn, BLOCK_K)):
            k_ok = offs_k < ffn - k * BLOCK_K
            a = tl.load(act_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            acc = _int8_step(a, w_ptrs, k_ok[:, None] & col_ok[None, :], acc, DOT_PRECISION)
            act_ptrs += BLOCK_K * stride_af
            w_ptrs += BLOCK_K * stride_qk
        acc *= tl.load(scale_ptr + slot * stride_ss + offs_n * stride_sn, mask=col_ok, other=0.0)[None, :]
    elif FORMAT == 2:
        offs_k = tl.arange(0, BLOCK_K)
        act_ptrs = act_ptr + pairs[:, None] * stride_ap + offs_k[None, :] * stride_af  # [BLOCK_M, BLOCK_K]
        w_ptrs = q_slot + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk  # [BLOCK_K, BLOCK_N]
        scale_ptrs = scale_ptr + slot * stride_ss + offs_n * stride_sn  # [BLOCK_N], group 0
        zero_ptrs = zero_ptr + slot * stride_zs + offs_n * stride_zn
        for k in range(ffn // BLOCK_K):
            group = (k * BLOCK_K) // GROUP
            a = tl.load(act_ptrs, mask=row_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            acc = _int8_group_step(
                a, w_ptrs, scale_ptrs + group * stride_sg, zero_ptrs + group * stride_zg, col_ok, acc, HAS_ZERO,
                CODE_OFFSET, DOT_PRECISION,
            )  # fmt: skip
            act_ptrs += BLOCK_K * stride_af
            w_ptrs += BLOCK_K * stride_qk
    else:
        offs_h = tl.arange(0, BLOCK_K // 2)
        act_ptrs = act_ptr + pairs[:, None] * stride_ap + tl.arange(0, BLOCK_K)[None, :] * stride_af  # [BM, BK]
        w_ptrs = q_slot + offs_n[None, :] * stride_qn + offs_h[:, None] * stride_qk  # [BK/2, BN] bytes
        scale_ptrs = scale_ptr + slot * stride_ss + offs_n * stride_sn  # [BLOCK_N], group 0
        zero_ptrs = zero_ptr + slot * stride_zs + offs_n * stride_zn
        for k in range(ffn // BLOCK_K):
            group = (k * BLOCK_K) // GROUP
            a = tl.load(act_ptrs, mask=row_ok[:, None], other=0.0)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))  # [BM, BK/2] inputs 2j, 2j + 1
            if UPCAST:
                a_even, a_odd = a_even.to(tl.float32), a_odd.to(tl.float32)
            acc = _int4_step(
                a_even, a_odd, w_ptrs, scale_ptrs + group * stride_sg, zero_ptrs + group * stride_zg,
                col_ok, acc, HAS_ZERO, SYMMETRIC_ZERO, DOT_PRECISION,
            )  # fmt: skip
            act_ptrs += BLOCK_K * stride_af
            w_ptrs += (BLOCK_K // 2) * stride_qk
    route = tl.load(weights_ptr + (pairs // TOP_K) * stride_rt + (pairs % TOP_K) * stride_rk, mask=row_ok, other=0.0)
    tl.store(y_ptrs, acc * route.to(tl.float32)[:, None], mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------- launchers


def int4_block_k(block_k: int, group_size: int) -> int:
    """The reduction step of an int4 or grouped int8 matrix: block_k cut to the largest power of two
    dividing the group size G (so a step lies in one group) and raised to INT4_MIN_BLOCK_K."""
    return max(INT4_MIN_BLOCK_K, min(block_k, group_size & -group_size))


def _format_code(m: QuantizedMatrix) -> int:
    if m.format == "int4":
        return INT4
    return INT8_GROUPED if m.grouped_int8 else INT8


def _format_name(m: QuantizedMatrix) -> str:
    """int8, int8g (grouped int8) or int4: one matrix's part of the block-config key."""
    return "int8g" if m.grouped_int8 else m.format


def format_key(w13: QuantizedMatrix, w2: QuantizedMatrix) -> str:
    """The block-config file key of a pair of formats: "int8", "int8g" (grouped int8), "int4", or
    "int8_int4" (w13's, w2's) where they differ."""
    first, second = _format_name(w13), _format_name(w2)
    return first if first == second else f"{first}_{second}"


def _matrix_args(m: QuantizedMatrix) -> tuple[list, list, dict]:
    """The arrays (q, scale, zero), their nine strides and the format constexprs of one matrix
    [S, N, K]. Without zeros the zero pointer is q's, never read (HAS_ZERO is off), so that the
    kernels' pointer arithmetic compiles."""
    q_strides = [m.q.stride(0), m.q.stride(1), m.q.stride(2)]
    if _format_code(m) == INT8:
        scale_strides = [m.scale.stride(0), m.scale.stride(1), 0]
    else:
        scale_strides = [m.scale.stride(0), m.scale.stride(1), m.scale.stride(2)]
    zero_strides = [0, 0, 0] if m.zero is None else [m.zero.stride(0), m.zero.stride(1), m.zero.stride(2)]
    constants = dict(
        FORMAT=_format_code(m),
        GROUP=m.group_size or 1,
        HAS_ZERO=m.zero is not None,
        SYMMETRIC_ZERO=INT4_SYMMETRIC_ZERO,
        CODE_OFFSET=INT8_CODE_OFFSET,
    )
    return [m.q, m.scale, m.q if m.zero is None else m.zero], q_strides + scale_strides + zero_strides, constants


def _block_k(m: QuantizedMatrix, config: BlockConfig) -> int:
    return config.block_k if _format_code(m) == INT8 else int4_block_k(config.block_k, m.group_size)


def _expect_quantized(m, name: str, shape: tuple, device: torch.device) -> None:
    _expect(isinstance(m, QuantizedMatrix), name, "a QuantizedMatrix", type(m).__name__)
    _expect(m.q.dim() == 3, f"{name} q", "a stack of slots [S, N, K]", list(m.q.shape))
    _expect(tuple(m.shape) == shape, f"{name} shape", str(list(shape)), list(m.shape))
    for array, what in ((m.q, "q"), (m.scale, "scale"), (m.zero, "zero")):
        if array is not None:
            _expect(array.device == device, f"{name} {what} device", str(device), array.device)


def quant_gate_up_act(
    x: torch.Tensor,
    w13: QuantizedMatrix,
    blocks: ExpertBlocks,
    top_k: int,
    act: torch.Tensor,
    config: BlockConfig,
    upcast: bool,
    *,
    activation: ExpertActivation = SILU,
    input_perm: torch.Tensor | None = None,
) -> None:
    """act[p] = activation(x[t] @ gate^T, x[t] @ up^T) for every pair p = t*K + k, into act [T*K, F],
    the weights w13 [S, 2F, D] dequantized in registers. input_perm: [S, D] int32 / int64 (any
    strides), each slot's input order: w13's packed input j multiplies x[t, input_perm[slot, j]]."""
    T, D = x.shape
    _expect(x.dtype in _DTYPES, "x dtype", "float16, bfloat16 or float32", x.dtype)
    _expect(isinstance(w13, QuantizedMatrix), "w13", "a QuantizedMatrix", type(w13).__name__)
    S, N2, _ = w13.shape
    _expect(N2 % 2 == 0, "w13 shape", f"[S, 2F, {D}]", list(w13.shape))
    F = N2 // 2
    _expect_quantized(w13, "w13", (S, 2 * F, D), x.device)
    _expect(blocks.num_pairs == T * top_k, "blocks.num_pairs", f"T * K = {T * top_k}", blocks.num_pairs)
    _expect_matrix(act, "act", (T * top_k, F), x.dtype, x.device)
    _expect_activation(activation)
    if input_perm is not None:
        _expect_input_perm(input_perm, S, D, x.device)
    arrays, strides, constants = _matrix_args(w13)
    perm, perm_strides = (w13.q, (0, 0)) if input_perm is None else (input_perm, input_perm.stride())
    num_blocks_m = blocks.block_slots.shape[0]
    grid = (num_blocks_m * triton.cdiv(F, config.block_n),)
    _quant_gate_up_act_kernel[grid](
        x, *arrays, perm, act, blocks.sorted_pairs, blocks.block_slots,
        blocks.num_pairs, num_blocks_m, F, D, float(activation.alpha), float(activation.limit),
        x.stride(0), x.stride(1), *strides, *perm_strides, act.stride(0), act.stride(1),
        TOP_K=top_k, **constants, HAS_PERM=input_perm is not None, BLOCK_M=blocks.block_m, BLOCK_N=config.block_n,
        BLOCK_K=_block_k(w13, config), GROUP_M=config.group_m, ACTIVATION=_ACTIVATION_CODES[activation.kind],
        UPCAST=upcast, DOT_PRECISION=_dot_precision(x.dtype, upcast),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def quant_down_weighted(
    act: torch.Tensor,
    w2: QuantizedMatrix,
    topk_weights: torch.Tensor,
    blocks: ExpertBlocks,
    y: torch.Tensor,
    config: BlockConfig,
    upcast: bool,
    *,
    host_share: bool = False,
) -> None:
    """y[p] = topk_weights[t, k] * (act[p] @ down^T) in float32, into y [T*K, D], the weights
    w2 [S, D, F] dequantized in registers; host_share: rows of HOST_SLOT experts are 0."""
    P, F = act.shape
    T, K = topk_weights.shape
    _expect(isinstance(w2, QuantizedMatrix), "w2", "a QuantizedMatrix", type(w2).__name__)
    S, D, _ = w2.shape
    _expect_quantized(w2, "w2", (S, D, F), act.device)
    _expect_matrix(topk_weights, "topk_weights", (T, K), torch.float32, act.device)
    _expect(
        P == blocks.num_pairs == T * K, "act rows", f"T * K = {T * K} = blocks.num_pairs", f"{P} and {blocks.num_pairs}"
    )
    _expect_matrix(y, "y", (P, D), torch.float32, act.device)
    arrays, strides, constants = _matrix_args(w2)
    num_blocks_m = blocks.block_slots.shape[0]
    grid = (num_blocks_m * triton.cdiv(D, config.block_n),)
    _quant_down_weighted_kernel[grid](
        act, *arrays, topk_weights, y, blocks.sorted_pairs, blocks.block_slots,
        blocks.num_pairs, num_blocks_m, D, F, act.stride(0), act.stride(1), *strides,
        topk_weights.stride(0), topk_weights.stride(1), y.stride(0), y.stride(1),
        TOP_K=K, **constants, BLOCK_M=blocks.block_m, BLOCK_N=config.block_n,
        BLOCK_K=_block_k(w2, config), GROUP_M=config.group_m, UPCAST=upcast,
        DOT_PRECISION=_dot_precision(act.dtype, upcast), HOST_SHARE=host_share, HOST_SLOT_ID=HOST_SLOT,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def _expect_input_perm(input_perm: torch.Tensor, slots: int, hidden: int, device: torch.device) -> None:
    _expect(
        tuple(input_perm.shape) == (slots, hidden), "input_perm shape", str([slots, hidden]), list(input_perm.shape)
    )
    _expect(input_perm.dtype in (torch.int32, torch.int64), "input_perm dtype", "int32 or int64", input_perm.dtype)
    _expect(input_perm.device == device, "input_perm device", str(device), input_perm.device)


def _expect_permutations(input_perm: torch.Tensor, slots: torch.Tensor, hidden: int) -> None:
    """The routed slots' rows of input_perm [S, D] are permutations of 0 .. D-1 (a data check: CPU only)."""
    rows = input_perm[slots[slots >= 0]].long()  # [U, D]
    ordered = torch.arange(hidden, dtype=torch.int64).expand_as(rows)
    bad = (rows.sort(dim=1).values != ordered).any(dim=1)
    _expect(
        not bool(bad.any()),
        "input_perm of routed slots",
        f"permutations of 0 .. {hidden - 1}",
        f"other rows in slots {slots[slots >= 0][bad].tolist()}",
    )


# ---------------------------------------------------------------------------------------- public


def fused_quant_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: QuantizedMatrix,
    w2: QuantizedMatrix,
    expert_slots: torch.Tensor,
    *,
    activation: ExpertActivation = SILU,
    host_share: bool = False,
    config: BlockConfig | None = None,
    upcast: bool | None = None,
    out: torch.Tensor | None = None,
    input_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed gated-MLP experts on quantized weights through a slot table; the contract of
    quantized_moe_experts_reference (see the module docstring).

    x: [T, D] float16/bfloat16/float32; topk_ids: [T, K] int64; topk_weights: [T, K] float32;
    w13: QuantizedMatrix [S, 2F, D], w2: QuantizedMatrix [S, D, F], int8, grouped int8 or int4 each
    (any slot strides); expert_slots: [E] int64, -1 for experts not resident (every routed expert must have a
    slot). Returns out [T, D] in x's dtype.
    activation: SwiGLU (SILU) or GPT-OSS's clamped SwiGLU; host_share: experts with slot HOST_SLOT
    add nothing (the host computes them); config: block sizes (None: the tuned file of this shape,
    dtype, format pair and device, else the heuristic; int4 cuts block_k to its groups, see
    int4_block_k); upcast: multiply in float32 (None: only bfloat16 under the interpreter); out:
    where to write; input_perm: [S, D] int32 / int64 (any strides), each slot's w13 input order
    (GPTQ's act order: w13 packs W13[:, perm], so it multiplies x[:, perm]), None for the identity.
    """
    _expect(x.dim() == 2, "x", "a [T, D] tensor", list(x.shape))
    T, D = x.shape
    _expect(x.dtype in _DTYPES, "x dtype", "float16, bfloat16 or float32", x.dtype)
    _expect(topk_ids.dim() == 2 and topk_ids.shape[0] == T, "topk_ids shape", f"[{T}, K]", list(topk_ids.shape))
    K = topk_ids.shape[1]
    _expect(topk_ids.device == x.device, "topk_ids device", str(x.device), topk_ids.device)
    _expect_matrix(topk_weights, "topk_weights", (T, K), torch.float32, x.device)
    _expect(isinstance(w13, QuantizedMatrix), "w13", "a QuantizedMatrix", type(w13).__name__)
    _expect(isinstance(w2, QuantizedMatrix), "w2", "a QuantizedMatrix", type(w2).__name__)
    _expect(w13.q.dim() == 3, "w13 q", "a stack of slots [S, N, K]", list(w13.q.shape))
    _expect(
        len(w13.shape) == 3 and w13.shape[1] % 2 == 0 and w13.shape[2] == D,
        "w13 shape",
        f"[S, 2F, {D}]",
        list(w13.shape),
    )
    S, F = w13.shape[0], w13.shape[1] // 2
    _expect_quantized(w13, "w13", (S, 2 * F, D), x.device)
    _expect_quantized(w2, "w2", (S, D, F), x.device)
    _expect_activation(activation)
    if input_perm is not None:
        _expect_input_perm(input_perm, S, D, x.device)
    if out is None:
        out = torch.empty_like(x)
    _expect_matrix(out, "out", (T, D), x.dtype, x.device)
    if T == 0 or K == 0:
        return out.zero_()
    if x.device.type == "cpu":
        check_routing(topk_ids, expert_slots, S, host_share)
        if input_perm is not None:
            _expect_permutations(input_perm, expert_slots[topk_ids.reshape(-1).unique()], D)
    upcast = _resolve_upcast(upcast, x.dtype)
    if config is None:
        config = moe_block_config(
            expert_slots.shape[0], F, D, x.dtype, T, device_name(x.device), format=format_key(w13, w2)
        )
    blocks = align_by_expert(topk_ids, expert_slots, config.block_m)
    act = torch.empty((T * K, F), dtype=x.dtype, device=x.device)  # [T*K, F]
    quant_gate_up_act(x, w13, blocks, K, act, config, upcast, activation=activation, input_perm=input_perm)
    y = torch.empty((T * K, D), dtype=torch.float32, device=x.device)  # [T*K, D]
    quant_down_weighted(act, w2, topk_weights, blocks, y, config, upcast, host_share=host_share)
    combine_topk(y, K, out)
    return out
