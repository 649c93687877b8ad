"""Fused gated-MLP experts read through a slot table (vLLM fused_moe / scattermoe style).

The T * K (token, expert) pairs are sorted by expert and each expert's run is padded to BLOCK_M,
so every row block belongs to one expert and reads one slot's weights:

    align_by_expert  topk_ids [T, K] -> sorted pair ids [P] (padding = T*K), a slot per row block
    gate_up_act      act[p] = activation(x[t] @ gate^T + b_gate, x[t] @ up^T + b_up)   act: [T*K, F]
    down_weighted    y[p] = topk_weight[p] * (act[p] @ w2^T + b2), float32              y:   [T*K, D]
    combine_topk     out[t] = y[t*K + 0] + ... + y[t*K + K-1], float32 sums             out: [T, D]

with p = t * K + k. Each pair's row is written by exactly one program and the combine sums a
token's K rows in a fixed order, so results are bitwise reproducible (no atomics).

Biases and activation: b13 [S, 2F] (gate biases then up biases) and b2 [S, D] are optional,
slot-indexed like the weights (GPT-OSS has them, the other families none); without them the
kernels compile without the bias loads (HAS_BIAS). The biases are added to the float32
accumulators, the gate/up ones before the activation, the down one before the routing weight.
The activation (kernels/expert_activation.py) is compiled in as the constant ACTIVATION: SwiGLU,
silu(gate) * up, or GPT-OSS's clamped SwiGLU, evaluated in float32 on the accumulators.

Shared experts: a shared expert is an always-routed expert. Callers append it as extra columns of
(topk_ids, topk_weights) with ids past the routed experts, and its slot at the end of the slot table
(see with_shared_experts). A shared MLP wider than F (DeepSeek: n_shared * F, Qwen2-MoE: 4 * F)
is split into F-wide experts, since a SwiGLU's ffn splits into a sum over column blocks.

Hybrid execution: an expert whose slot is HOST_SLOT is computed on the host (its weights are in
host memory, not in a slot); with host_share its pairs' rows of y are zeros here, so out holds the
device's share and the caller adds the host's (kernels/hybrid_experts.py).

Weights and biases are strided views: w13 [S, 2F, D], w2 [S, D, F], b13 [S, 2F] and b2 [S, D]
may have a slot stride larger than their slot's size (the offload pool packs each slot as an
aligned record), so every kernel takes all strides and computes slot offsets in int64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeinf.kernels.block_configs import BlockConfig, device_name, interpreting, moe_block_config
from moeinf.kernels.expert_activation import SILU, ExpertActivation

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACTIVATION_CODES = {"silu": 0, "clamped_swiglu": 1}  # ExpertActivation.kind -> the ACTIVATION constexpr
HOST_SLOT = -2  # the slot of an expert the host computes: runtime/cache/placement.py's HOST


@triton.jit
def _block_ids(pid, num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
    # GROUP_M row blocks in a row take the same column tile one after another: consecutive row
    # blocks mostly share an expert, so their weight tile is read from L2 instead of HBM
    blocks_in_group = GROUP_M * num_blocks_n
    first_m = (pid // blocks_in_group) * GROUP_M
    group_rows = min(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % blocks_in_group) % group_rows
    pid_n = (pid % blocks_in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _activation(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    # gate, up: [BLOCK_M, BLOCK_N] float32 -> [BLOCK_M, BLOCK_N] float32; ExpertActivation's formulas
    if ACTIVATION == 0:
        # silu(gate) * up
        act = gate * tl.sigmoid(gate) * up
    else:
        # clamped swiglu: gate = min(gate, limit); up = clamp(up, -limit, limit)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    return act


@triton.jit
def _gate_up_act_kernel(
    x_ptr,  # x: [T, D]
    w13_ptr,  # w13: [S, 2F, D], gate rows then up rows
    b13_ptr,  # b13: [S, 2F], gate biases then up biases; None without biases
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
    stride_ws,
    stride_wf,
    stride_wd,
    stride_bs,
    stride_bf,
    stride_ap,
    stride_af,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0: silu, 1: clamped swiglu
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _block_ids(tl.program_id(0), num_blocks_m, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    slot = tl.load(block_slots_ptr + pid_m).to(tl.int64)
    if slot < 0:
        # padding blocks past the last expert; a routed expert without a slot is flagged by the
        # down kernel, which owns the rows every later stage reads
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + offs_m).to(tl.int64)
    row_ok = pairs < num_pairs
    tokens = pairs // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < ffn
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xd  # [BLOCK_M, BLOCK_K]
    gate_ptrs = w13_ptr + slot * stride_ws + offs_n[None, :] * stride_wf + offs_k[:, None] * stride_wd  # [BK, BN]
    up_ptrs = gate_ptrs + ffn * stride_wf
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(hidden, BLOCK_K)):
        k_ok = offs_k < hidden - k * BLOCK_K
        xs = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            # the interpreter's bfloat16 arithmetic is wrong; casts are right, so it multiplies fp32
            xs, gate, up = xs.to(tl.float32), gate.to(tl.float32), up.to(tl.float32)
        acc_gate = tl.dot(xs, gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(xs, up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        gate_ptrs += BLOCK_K * stride_wd
        up_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        gate_bias_ptrs = b13_ptr + slot * stride_bs + offs_n * stride_bf  # [BLOCK_N]
        acc_gate += tl.load(gate_bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(gate_bias_ptrs + ffn * stride_bf, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    act = _activation(acc_gate, acc_up, alpha, limit, ACTIVATION)
    act_ptrs = act_ptr + pairs[:, None] * stride_ap + offs_n[None, :] * stride_af
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_weighted_kernel(
    act_ptr,  # act: [T*K, F]
    w2_ptr,  # w2: [S, D, F]
    b2_ptr,  # b2: [S, D]; None without biases
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
    stride_ws,
    stride_wd,
    stride_wf,
    stride_bs,
    stride_bd,
    stride_rt,
    stride_rk,
    stride_yp,
    stride_yd,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
        # padding blocks have no valid rows and store nothing; rows of a routed expert that has
        # no slot (a caller bug the launcher cannot see without a device sync) become NaN, those
        # of an expert the host computes (HOST_SHARE) zeros
        if HOST_SHARE:
            fill = tl.where(slot == HOST_SLOT_ID, 0.0, float("nan"))
        else:
            fill = float("nan")
        rows = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + fill
        tl.store(y_ptrs, rows, mask=row_ok[:, None] & col_ok[None, :])
        return
    offs_k = tl.arange(0, BLOCK_K)
    act_ptrs = act_ptr + pairs[:, None] * stride_ap + offs_k[None, :] * stride_af  # [BLOCK_M, BLOCK_K]
    w_ptrs = w2_ptr + slot * stride_ws + offs_n[None, :] * stride_wd + offs_k[:, None] * stride_wf  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(ffn, BLOCK_K)):
        k_ok = offs_k < ffn - k * BLOCK_K
        a = tl.load(act_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        act_ptrs += BLOCK_K * stride_af
        w_ptrs += BLOCK_K * stride_wf
    if HAS_BIAS:
        # the bias belongs to the expert's output, before the routing weight scales it
        acc += tl.load(b2_ptr + slot * stride_bs + offs_n * stride_bd, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    route = tl.load(weights_ptr + (pairs // TOP_K) * stride_rt + (pairs % TOP_K) * stride_rk, mask=row_ok, other=0.0)
    tl.store(y_ptrs, acc * route.to(tl.float32)[:, None], mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    y_ptr,  # y: [T*K, D] float32
    out_ptr,  # out: [T, D]
    num_tokens,
    hidden,
    stride_yp,
    stride_yd,
    stride_ot,
    stride_od,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < num_tokens)[:, None] & (cols < hidden)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        # a fixed summation order, k = 0 .. K-1, whatever order the GEMM programs ran in
        pairs = rows.to(tl.int64) * TOP_K + k
        acc += tl.load(y_ptr + pairs[:, None] * stride_yp + cols[None, :] * stride_yd, mask=mask, other=0.0)
    tl.store(
        out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty), mask=mask
    )


# ---------------------------------------------------------------------------------------- launchers


class ExpertBlocks(NamedTuple):
    """The pairs of one call, sorted by expert and padded per expert to block_m."""

    sorted_pairs: torch.Tensor  # [P] int32 pair ids t*K + k grouped by expert; T*K marks padding
    block_slots: torch.Tensor  # [P / block_m] int32 slot of each row block's expert; -1: padding only
    num_pairs: int  # T * K
    block_m: int


def _expect(condition: bool, what: str, expected: str, found) -> None:
    if not condition:
        raise ValueError(f"{what}: expected {expected}, found {found}")


def _expect_matrix(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    _expect(tuple(t.shape) == shape, f"{name} shape", str(list(shape)), list(t.shape))
    _expect(t.dtype == dtype, f"{name} dtype", str(dtype), t.dtype)
    _expect(t.device == device, f"{name} device", str(device), t.device)


def _dot_precision(dtype: torch.dtype, upcast: bool) -> str | None:
    # float32 operands would run as tf32 on tensor cores by default; the fp32 path must be exact.
    # None leaves 16-bit operands to Triton's default.
    return "ieee" if dtype == torch.float32 or upcast else None


def _resolve_upcast(upcast: bool | None, dtype: torch.dtype) -> bool:
    """Default: upcast bfloat16 tiles to float32 only in the interpreter, whose bf16 math is wrong."""
    return (interpreting() and dtype == torch.bfloat16) if upcast is None else bool(upcast)


def align_by_expert(topk_ids: torch.Tensor, expert_slots: torch.Tensor, block_m: int) -> ExpertBlocks:
    """Sorts the (token, expert) pairs by expert and pads each expert's run to block_m.

    topk_ids: [T, K] int64 expert ids; expert_slots: [E] slot of each expert. Runs on the device
    without a host sync: the number of row blocks is the static bound
    ceil((T*K + min(E, T*K) * (block_m - 1)) / block_m), and blocks past the real end are padding.
    """
    _expect(topk_ids.dim() == 2, "topk_ids", "a [T, K] tensor", list(topk_ids.shape))
    _expect(topk_ids.dtype == torch.int64, "topk_ids dtype", "torch.int64", topk_ids.dtype)
    _expect(expert_slots.dim() == 1, "expert_slots", "an [E] tensor", list(expert_slots.shape))
    _expect(
        expert_slots.dtype in (torch.int32, torch.int64), "expert_slots dtype", "int32 or int64", expert_slots.dtype
    )
    _expect(expert_slots.device == topk_ids.device, "expert_slots device", str(topk_ids.device), expert_slots.device)
    num_pairs, num_experts = topk_ids.numel(), expert_slots.shape[0]
    _expect(num_pairs < 2**31 - 1, "T * K", "fewer than 2**31 - 1 pairs (int32 pair ids)", num_pairs)
    device = topk_ids.device
    flat = topk_ids.reshape(-1)  # [T*K]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync to size its output
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    order = torch.argsort(flat, stable=True)  # [T*K] pair ids grouped by expert
    experts = flat[order]  # [T*K] expert of each sorted pair
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[experts]
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    num_blocks = triton.cdiv(bound, block_m)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[(padded_end - padded)[experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m  # [P / block_m]
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # E past the last expert
    slot_of_block = expert_slots[block_expert.clamp(max=num_experts - 1)]
    block_slots = torch.where(block_expert < num_experts, slot_of_block, -1).to(torch.int32)
    return ExpertBlocks(sorted_pairs, block_slots, num_pairs, block_m)


def _expect_activation(activation: ExpertActivation) -> None:
    _expect(isinstance(activation, ExpertActivation), "activation", "an ExpertActivation", type(activation).__name__)
    kinds = ", ".join(_ACTIVATION_CODES)
    _expect(activation.kind in _ACTIVATION_CODES, "activation kind", f"one of {kinds}", activation.kind)


def gate_up_act(
    x: torch.Tensor,
    w13: torch.Tensor,
    blocks: ExpertBlocks,
    top_k: int,
    act: torch.Tensor,
    config: BlockConfig,
    upcast: bool,
    *,
    b13: torch.Tensor | None = None,
    activation: ExpertActivation = SILU,
) -> None:
    """act[p] = activation(x[t] @ gate^T + b_gate, x[t] @ up^T + b_up) for every pair p = t*K + k,
    into act [T*K, F]. b13: [S, 2F] gate biases then up biases (any strides, x's dtype), or None."""
    T, D = x.shape
    _expect(x.dtype in _DTYPES, "x dtype", "float16, bfloat16 or float32", x.dtype)
    _expect(
        w13.dim() == 3 and w13.shape[1] % 2 == 0 and w13.shape[2] == D, "w13 shape", f"[S, 2F, {D}]", list(w13.shape)
    )
    F = w13.shape[1] // 2
    _expect(
        w13.dtype == x.dtype and w13.device == x.device,
        "w13 dtype/device",
        f"{x.dtype} on {x.device}",
        f"{w13.dtype} on {w13.device}",
    )
    _expect(blocks.num_pairs == T * top_k, "blocks.num_pairs", f"T * K = {T * top_k}", blocks.num_pairs)
    _expect_matrix(act, "act", (T * top_k, F), x.dtype, x.device)
    if b13 is not None:
        _expect_matrix(b13, "b13", (w13.shape[0], 2 * F), x.dtype, x.device)
    _expect_activation(activation)
    bias_strides = (0, 0) if b13 is None else (b13.stride(0), b13.stride(1))
    num_blocks_m = blocks.block_slots.shape[0]
    grid = (num_blocks_m * triton.cdiv(F, config.block_n),)
    _gate_up_act_kernel[grid](
        x, w13, b13, act, blocks.sorted_pairs, blocks.block_slots,
        blocks.num_pairs, num_blocks_m, F, D, float(activation.alpha), float(activation.limit),
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), *bias_strides,
        act.stride(0), act.stride(1),
        TOP_K=top_k, BLOCK_M=blocks.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, HAS_BIAS=b13 is not None, ACTIVATION=_ACTIVATION_CODES[activation.kind],
        UPCAST=upcast, DOT_PRECISION=_dot_precision(x.dtype, upcast),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def down_weighted(
    act: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    blocks: ExpertBlocks,
    y: torch.Tensor,
    config: BlockConfig,
    upcast: bool,
    *,
    b2: torch.Tensor | None = None,
    host_share: bool = False,
) -> None:
    """y[p] = topk_weights[t, k] * (act[p] @ down^T + b2) in float32, into y [T*K, D].
    b2: [S, D] (any strides, act's dtype), or None; host_share: rows of HOST_SLOT experts are 0."""
    P, F = act.shape
    T, K = topk_weights.shape
    _expect(w2.dim() == 3 and w2.shape[2] == F, "w2 shape", f"[S, D, {F}]", list(w2.shape))
    D = w2.shape[1]
    _expect(
        w2.dtype == act.dtype and w2.device == act.device,
        "w2 dtype/device",
        f"{act.dtype} on {act.device}",
        f"{w2.dtype} on {w2.device}",
    )
    _expect_matrix(topk_weights, "topk_weights", (T, K), torch.float32, act.device)
    _expect(
        P == blocks.num_pairs == T * K, "act rows", f"T * K = {T * K} = blocks.num_pairs", f"{P} and {blocks.num_pairs}"
    )
    _expect_matrix(y, "y", (P, D), torch.float32, act.device)
    if b2 is not None:
        _expect_matrix(b2, "b2", (w2.shape[0], D), act.dtype, act.device)
    bias_strides = (0, 0) if b2 is None else (b2.stride(0), b2.stride(1))
    num_blocks_m = blocks.block_slots.shape[0]
    grid = (num_blocks_m * triton.cdiv(D, config.block_n),)
    _down_weighted_kernel[grid](
        act, w2, b2, topk_weights, y, blocks.sorted_pairs, blocks.block_slots,
        blocks.num_pairs, num_blocks_m, D, F,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), *bias_strides,
        topk_weights.stride(0), topk_weights.stride(1), y.stride(0), y.stride(1),
        TOP_K=K, BLOCK_M=blocks.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, HAS_BIAS=b2 is not None, UPCAST=upcast,
        DOT_PRECISION=_dot_precision(act.dtype, upcast), HOST_SHARE=host_share, HOST_SLOT_ID=HOST_SLOT,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def combine_topk(y: torch.Tensor, top_k: int, out: torch.Tensor) -> None:
    """out[t] = sum over k = 0 .. K-1 of y[t*K + k], summed in float32, into out [T, D]."""
    T, D = out.shape
    _expect_matrix(y, "y", (T * top_k, D), torch.float32, out.device)
    block_d = min(triton.next_power_of_2(D), 1024 if interpreting() else 256)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_d))
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](
        y, out, T, D, y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip


def check_routing(topk_ids: torch.Tensor, expert_slots: torch.Tensor, num_slots: int, host_share: bool = False) -> None:
    """Data checks that read the tensors: every routed id names an expert, every routed expert a
    slot (or, with host_share, HOST_SLOT). On a GPU they would stall the stream, so fused_moe runs
    them only on the CPU."""
    E = expert_slots.shape[0]
    if topk_ids.numel() == 0:
        return
    low, high = int(topk_ids.min()), int(topk_ids.max())
    _expect(0 <= low and high < E, "topk_ids values", f"expert ids in [0, {E})", f"ids in [{low}, {high}]")
    routed = expert_slots[topk_ids.reshape(-1).unique()]
    if host_share:
        routed = routed[routed != HOST_SLOT]
    _expect(
        bool(((routed >= 0) & (routed < num_slots)).all()),
        "expert_slots of routed experts",
        f"slots in [0, {num_slots})",
        sorted(set(routed.tolist()) - set(range(num_slots))),
    )


def with_shared_experts(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_slots: torch.Tensor,
    shared_slots: torch.Tensor,
    shared_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routes every token also to the shared experts, as extra top-k columns.

    topk_ids, topk_weights: [T, K]; expert_slots: [E]; shared_slots: [N] slots holding the shared
    experts (an F-wide piece each); shared_weights: [T, N] float32 per-token gates (e.g. Qwen2-MoE's
    sigmoid shared gate), None for weight 1. Returns ids [T, K+N] (shared ids E .. E+N-1),
    weights [T, K+N] float32 and slots [E+N], for fused_moe or the reference.
    """
    T, _ = topk_ids.shape
    N, E = shared_slots.shape[0], expert_slots.shape[0]
    if shared_weights is None:
        shared_weights = torch.ones((T, N), dtype=torch.float32, device=topk_weights.device)
    _expect_matrix(shared_weights, "shared_weights", (T, N), torch.float32, topk_weights.device)
    shared_ids = torch.arange(E, E + N, dtype=topk_ids.dtype, device=topk_ids.device).expand(T, N)
    return (
        torch.cat([topk_ids, shared_ids], dim=1),
        torch.cat([topk_weights, shared_weights], dim=1),
        torch.cat([expert_slots, shared_slots.to(expert_slots.dtype)]),
    )


# ---------------------------------------------------------------------------------------- public


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_slots: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ExpertActivation = SILU,
    upcast: bool | None = None,
    config: BlockConfig | None = None,
    out: torch.Tensor | None = None,
    host_share: bool = False,
) -> torch.Tensor:
    """Routed gated-MLP experts through a slot table; the contract of moe_experts_reference.

    x: [T, D] float16/bfloat16/float32; topk_ids: [T, K] int64; topk_weights: [T, K] float32;
    w13: [S, 2F, D]; w2: [S, D, F] (any strides, x's dtype); expert_slots: [E] int64, -1 for
    experts not resident (every routed expert must have a slot). Returns out [T, D] in x's dtype.
    b13: [S, 2F] gate then up biases, b2: [S, D] down biases (any strides, x's dtype; both or
    neither); activation: SwiGLU (SILU) or GPT-OSS's clamped SwiGLU.
    upcast: multiply in float32 (None: only bfloat16 under the interpreter); config: block sizes
    (None: the tuned file for this shape and device, else the heuristic); out: where to write;
    host_share: experts with slot HOST_SLOT add nothing (the host computes them: out is the rest).
    """
    _expect(x.dim() == 2, "x", "a [T, D] tensor", list(x.shape))
    T, D = x.shape
    _expect(topk_ids.dim() == 2 and topk_ids.shape[0] == T, "topk_ids shape", f"[{T}, K]", list(topk_ids.shape))
    K = topk_ids.shape[1]
    _expect(topk_ids.device == x.device, "topk_ids device", str(x.device), topk_ids.device)
    _expect_matrix(topk_weights, "topk_weights", (T, K), torch.float32, x.device)
    _expect(w13.dim() == 3 and w13.shape[1] % 2 == 0, "w13", "an [S, 2F, D] tensor", list(w13.shape))
    S, F = w13.shape[0], w13.shape[1] // 2
    _expect(tuple(w2.shape) == (S, D, F), "w2 shape", str([S, D, F]), list(w2.shape))
    _expect(
        (b13 is None) == (b2 is None),
        "b13 and b2",
        "both or neither",
        f"b13 {'None' if b13 is None else 'given'}, b2 {'None' if b2 is None else 'given'}",
    )
    if b13 is not None:
        _expect_matrix(b13, "b13", (S, 2 * F), x.dtype, x.device)
        _expect_matrix(b2, "b2", (S, D), x.dtype, x.device)
    _expect_activation(activation)
    if out is None:
        out = torch.empty_like(x)
    _expect_matrix(out, "out", (T, D), x.dtype, x.device)
    if T == 0 or K == 0:
        return out.zero_()
    if x.device.type == "cpu":
        check_routing(topk_ids, expert_slots, S, host_share)
    upcast = _resolve_upcast(upcast, x.dtype)
    if config is None:
        config = moe_block_config(expert_slots.shape[0], F, D, x.dtype, T, device_name(x.device))
    blocks = align_by_expert(topk_ids, expert_slots, config.block_m)
    act = torch.empty((T * K, F), dtype=x.dtype, device=x.device)  # [T*K, F]
    gate_up_act(x, w13, blocks, K, act, config, upcast, b13=b13, activation=activation)
    y = torch.empty((T * K, D), dtype=torch.float32, device=x.device)  # [T*K, D]
    down_weighted(act, w2, topk_weights, blocks, y, config, upcast, b2=b2, host_share=host_share)
    combine_topk(y, K, out)
    return out
