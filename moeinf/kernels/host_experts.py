"""Routed experts computed on the host (CPU) at memory bandwidth, straight out of the slot buffers.

A decode step routes a handful of tokens to each expert, so its expert GEMMs are matrix-vector
products bound by the bytes of weights they read. torch's CPU linear reads them at full speed for
one float32 token but far below it for 4-32 tokens, and for bfloat16 weights at any count; these
kernels read each weight row once for all of an expert's tokens (4-row x 4-token register tiles,
a token left over from them against 8 rows a pass, the row's dot products vectorised along the
input axis) and widen bfloat16 to float32 in registers, never into a float32 copy of the weight.

One call computes a whole MoE layer: the (token, k) pairs sorted by expert, every active expert's
gate/up rows in one parallel pass, the activation, every down row in a second pass, then each
token's K weighted outputs summed in k order. Weights are read where they sit: w13 [S, 2F, D] and
w2 [S, D, F] (and b13 [S, 2F], b2 [S, D]) may be strided views into the store's record layout
(the expert pool) or plain tensors (resident experts), as long as each slot's block is contiguous.

The arithmetic is moe_experts_reference's (reference.py) with its roundings: float32 accumulation
in every dot product; with bfloat16 inputs each GEMM output, bias add, activation step and
model-dtype routing product rounded to bfloat16 (round to nearest even) where the reference's
bfloat16 tensors round; products summed over k in float32 and rounded once. Only the order of the
additions inside a dot product differs (vectorised partial sums): float32 outputs agree with the
reference to ~1e-7 relative, bfloat16 ones to the last bit but where a float32 sum lands within
that of a rounding boundary. The order is fixed by the compiled code, not by where a slot sits,
so an offloaded run equals the resident one bit for bit.
"""

from __future__ import annotations

import functools
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from moeinf.kernels.bf16_bits import as_numpy, as_tensor, empty_like_elements, narrow, rounded, widen
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.numba_cache import CALLS_PARALLEL
from moeinf.kernels.quantize import QuantizedMatrix
from moeinf.kernels.reference import expect_both_biases_or_neither

DTYPES = (torch.float32, torch.bfloat16)  # weights and activations these kernels take
MAX_TOKENS = 32  # tokens a call is meant for (decode); prefill-sized steps run the grouped matmuls
ROWS_PER_ITEM = 32  # weight rows one parallel work item computes
ACTIVATIONS_PER_ITEM = 512  # activation outputs one parallel work item computes
ACTIVATIONS = {"silu": 0, "clamped_swiglu": 1}
# Reassociation lets a dot product run as vectorised partial sums, contraction fuses its multiply-adds;
# no flag that assumes away NaN or infinity (the activation's exp overflows for very negative gates)
FAST = {"reassoc", "contract"}


# ---------------------------------------------------------------------------------- jit bodies


@njit(fastmath=FAST, cache=True)
def _dot_rows(w, r, xs, p0, count, out, col, K):
    """out[p0 + i, col + j] = w[r + j] . xs[p0 + i] for i < count, j < 4: four weight rows against
    `count` token rows, four tokens at a time (each weight row read once per four tokens).
    w: [N, K] weight elements (float32 or bfloat16 bits); xs: [P, K] float32; out: [P, >= col + 4]."""
    i = 0
    while i + 4 <= count:
        a, b, c, d = p0 + i, p0 + i + 1, p0 + i + 2, p0 + i + 3
        s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
        s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
        for k in range(K):
            w0, w1, w2, w3 = widen(w[r, k]), widen(w[r + 1, k]), widen(w[r + 2, k]), widen(w[r + 3, k])
            x0, x1, x2, x3 = xs[a, k], xs[b, k], xs[c, k], xs[d, k]
            s00 += w0 * x0
            s01 += w1 * x0
            s02 += w2 * x0
            s03 += w3 * x0
            s10 += w0 * x1
            s11 += w1 * x1
            s12 += w2 * x1
            s13 += w3 * x1
            s20 += w0 * x2
            s21 += w1 * x2
            s22 += w2 * x2
            s23 += w3 * x2
            s30 += w0 * x3
            s31 += w1 * x3
            s32 += w2 * x3
            s33 += w3 * x3
        out[a, col], out[a, col + 1], out[a, col + 2], out[a, col + 3] = s00, s01, s02, s03
        out[b, col], out[b, col + 1], out[b, col + 2], out[b, col + 3] = s10, s11, s12, s13
        out[c, col], out[c, col + 1], out[c, col + 2], out[c, col + 3] = s20, s21, s22, s23
        out[d, col], out[d, col + 1], out[d, col + 2], out[d, col + 3] = s30, s31, s32, s33
        i += 4
    while i < count:
        a = p0 + i
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for k in range(K):
            x0 = xs[a, k]
            s0 += widen(w[r, k]) * x0
            s1 += widen(w[r + 1, k]) * x0
            s2 += widen(w[r + 2, k]) * x0
            s3 += widen(w[r + 3, k]) * x0
        out[a, col], out[a, col + 1], out[a, col + 2], out[a, col + 3] = s0, s1, s2, s3
        i += 1


@njit(fastmath=FAST, cache=True)
def _dot_eight_rows(w, r, xs, p, out, col, K):
    """out[p, col + j] = w[r + j] . xs[p] for j < 8: one token against eight weight rows (a token
    left over from the 4-token tiles; eight rows a pass, not four, keep twice the loads in flight
    and halve the passes over xs[p]: 1.2-1.4x faster on the default model's short rows)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    for k in range(K):
        x = xs[p, k]
        s0 += widen(w[r, k]) * x
        s1 += widen(w[r + 1, k]) * x
        s2 += widen(w[r + 2, k]) * x
        s3 += widen(w[r + 3, k]) * x
        s4 += widen(w[r + 4, k]) * x
        s5 += widen(w[r + 5, k]) * x
        s6 += widen(w[r + 6, k]) * x
        s7 += widen(w[r + 7, k]) * x
    out[p, col], out[p, col + 1], out[p, col + 2], out[p, col + 3] = s0, s1, s2, s3
    out[p, col + 4], out[p, col + 5], out[p, col + 6], out[p, col + 7] = s4, s5, s6, s7


@njit(fastmath=FAST, cache=True)
def _dot_row(w, r, xs, p0, count, out, col, K):
    """out[p0 + i, col] = w[r] . xs[p0 + i] for i < count: one weight row (the last rows of a
    matrix whose height is not a multiple of 4)."""
    for i in range(count):
        s = np.float32(0.0)
        for k in range(K):
            s += widen(w[r, k]) * xs[p0 + i, k]
        out[p0 + i, col] = s


@njit(fastmath=FAST, inline="always")
def _matrix(flat, offset, stride, slot, rows, cols):
    """Slot `slot`'s [rows, cols] block of a slot-indexed weight: flat is the buffer's elements,
    slot s's block starts at offset + s * stride and is contiguous."""
    start = offset + slot * stride
    return flat[start : start + rows * cols].reshape(rows, cols)


@njit(fastmath=FAST, inline="always")
def _expert_block(first, second, slots, second_slots, e, rows, cols):
    """Expert e's [rows, cols] block: from the second buffer where second_slots[e] >= 0 (an expert
    computed from the host tier), else from the first (the slots) at slots[e]. first, second:
    (flat elements, offset, stride) of one weight kind in each buffer."""
    if second_slots[e] >= 0:
        return _matrix(second[0], second[1], second[2], second_slots[e], rows, cols)
    return _matrix(first[0], first[1], first[2], slots[e], rows, cols)


@njit(parallel=True, fastmath=FAST, cache=True)
def _project(first, second, slots, second_slots, experts, starts, counts, xs, out, N, K):
    """out[pairs of e, :N] = xs[pairs of e] @ W_e^T for every active expert e, in parallel over
    (expert, block of ROWS_PER_ITEM weight rows). W_e: expert e's [N, K] block (_expert_block).
    Eight rows at a time: the expert's tokens in 4-token tiles over each four of them, the tokens
    left over one at a time over all eight; then the block's last rows four and one at a time."""
    blocks = (N + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for item in prange(experts.shape[0] * blocks):
        e = experts[item // blocks]
        w = _expert_block(first, second, slots, second_slots, e, N, K)
        r = (item % blocks) * ROWS_PER_ITEM
        last = min(r + ROWS_PER_ITEM, N)
        tiled = counts[e] - counts[e] % 4  # the expert's tokens that fill 4-token tiles
        while r + 8 <= last:
            _dot_rows(w, r, xs, starts[e], tiled, out, r, K)
            _dot_rows(w, r + 4, xs, starts[e], tiled, out, r + 4, K)
            for p in range(starts[e] + tiled, starts[e] + counts[e]):
                _dot_eight_rows(w, r, xs, p, out, r, K)
            r += 8
        while r + 4 <= last:
            _dot_rows(w, r, xs, starts[e], counts[e], out, r, K)
            r += 4
        while r < last:
            _dot_row(w, r, xs, starts[e], counts[e], out, r, K)
            r += 1


@njit(fastmath=FAST, cache=True, parallel=CALLS_PARALLEL)
def project_dense(w, xs, out):
    """out[:, :N] = xs @ w^T, unrounded, for one dense weight: _project's tiles over a single matrix,
    in parallel over its row blocks (the decode block's projections, host_decode_block.py).
    w: [N, K] C-contiguous float32 or bfloat16 bits; xs: [T, K] float32; out: [T, >= N] float32."""
    N, K = w.shape
    block = (w.reshape(-1), 0, 0)  # (flat elements, offset, slot stride) of a buffer of one slot
    zero = np.zeros(1, np.int64)
    _project(block, block, zero, np.full(1, -1, np.int64), zero, zero, np.full(1, xs.shape[0], np.int64), xs, out, N, K)


@njit(parallel=True, fastmath=FAST, cache=True)
def _activate(gate_up, expert_of, slots, second_slots, b13, b13_second, has_bias, bf16, activation, alpha, limit, act):
    """act[q] = activation(gate, up) of row q's gate_up [2F] (+ its expert's b13), in the
    reference's roundings, in parallel over (row, block of ACTIVATIONS_PER_ITEM): a scalar exp per
    element, ~25 ns in bfloat16, 0.1 ms a layer of the default model's one-token decode serially.
    gate_up: [P, 2F] float32; act: [P, F] float32."""
    F = act.shape[1]
    lim = rounded(limit, bf16)  # clamp bounds are cast to the tensor's dtype
    blocks = (F + ACTIVATIONS_PER_ITEM - 1) // ACTIVATIONS_PER_ITEM
    for item in prange(gate_up.shape[0] * blocks):
        q, first = item // blocks, (item % blocks) * ACTIVATIONS_PER_ITEM
        if has_bias:
            bias = _expert_block(b13, b13_second, slots, second_slots, expert_of[q], 1, 2 * F)
        else:
            bias = b13[0][:1].reshape(1, 1)
        for f in range(first, min(first + ACTIVATIONS_PER_ITEM, F)):
            gate = rounded(gate_up[q, f], bf16)
            up = rounded(gate_up[q, F + f], bf16)
            if has_bias:  # added to the rounded product, as the reference (and transformers) add it
                gate = rounded(gate + widen(bias[0, f]), bf16)
                up = rounded(up + widen(bias[0, F + f]), bf16)
            if activation == 0:  # silu(gate) * up, each tensor op rounded
                silu = rounded(gate / (np.float32(1.0) + np.exp(-gate)), bf16)
                act[q, f] = rounded(silu * up, bf16)
            else:  # (clamp(up) + 1) * (min(gate, limit) * sigmoid(alpha * min(gate, limit)))
                gate = min(gate, lim)
                up = min(max(up, -lim), lim)
                scaled = rounded(gate * alpha, bf16)
                glu = rounded(gate * rounded(np.float32(1.0) / (np.float32(1.0) + np.exp(-scaled)), bf16), bf16)
                act[q, f] = rounded(rounded(up + np.float32(1.0), bf16) * glu, bf16)


@njit(fastmath=FAST, cache=True)
def _combine(y, position, ids, weights, slots, second_slots, b2, b2_second, has_bias, bf16, weigh_bf16, out):
    """out[t] = sum over k, in k order, of token t's k-th expert output (+ b2) times its weight,
    in float32, rounded once to out's dtype. y: [P, D] float32 down outputs in expert order;
    weights: [T, K] float32 or bfloat16 bits; out: [T, D] float32 or bfloat16 bits."""
    T, K = ids.shape
    D = y.shape[1]
    total = np.empty(D, np.float32)  # [D] token t's sum
    for t in range(T):
        for d in range(D):
            total[d] = 0.0
        for k in range(K):
            q = position[t * K + k]
            if has_bias:
                bias = _expert_block(b2, b2_second, slots, second_slots, ids[t, k], 1, D)
            else:
                bias = b2[0][:1].reshape(1, 1)
            for d in range(D):
                value = rounded(y[q, d], bf16)
                if has_bias:
                    value = rounded(value + widen(bias[0, d]), bf16)
                total[d] += rounded(value * widen(weights[t, k]), weigh_bf16)
        for d in range(D):
            out[t, d] = narrow(total[d], out[t, d])


@njit(cache=True, parallel=CALLS_PARALLEL)
def moe_layer_rows(
    x, ids, weights, slots, second_slots, w13, w13_second, w2, w2_second, b13, b13_second, b2, b2_second,
    has_bias, bf16, weigh_bf16, activation, alpha, limit, F, out,
):  # fmt: skip
    """x: [T, D] float32, or bfloat16 bits where bf16; ids: [T, K] int64; weights: [T, K] float32,
    or bfloat16 bits where weigh_bf16; slots, second_slots: [E] int64, where each expert sits in
    the first buffer and, where >= 0, in the second; w13, w2, b13, b2 and their _second: (flat
    weight elements, offset, slot stride) of each kind in each buffer (biases read only where
    has_bias); out: [T, D] in x's dtype, each token's weighted sum."""
    T, K = ids.shape
    D = x.shape[1]
    E = slots.shape[0]
    P = T * K
    # the (token, k) pairs sorted by expert, stably: expert e's pairs are rows starts[e] : + counts[e]
    counts = np.zeros(E, np.int64)
    for p in range(P):
        counts[ids[p // K, p % K]] += 1
    starts = np.zeros(E, np.int64)
    for e in range(1, E):
        starts[e] = starts[e - 1] + counts[e - 1]
    fill = starts.copy()
    position = np.empty(P, np.int64)  # [P] each pair's row in expert order
    expert_of = np.empty(P, np.int64)  # [P] the expert of each row in expert order
    xs = np.empty((P, D), np.float32)  # [P, D] the pairs' tokens, in expert order
    for p in range(P):
        e = ids[p // K, p % K]
        position[p] = fill[e]
        expert_of[fill[e]] = e
        for d in range(D):
            xs[fill[e], d] = widen(x[p // K, d])
        fill[e] += 1
    active = 0
    for e in range(E):
        active += counts[e] > 0
    experts = np.empty(active, np.int64)  # [A] the active experts, ascending
    active = 0
    for e in range(E):
        if counts[e] > 0:
            experts[active] = e
            active += 1
    gate_up = np.empty((P, 2 * F), np.float32)  # [P, 2F]
    _project(w13, w13_second, slots, second_slots, experts, starts, counts, xs, gate_up, 2 * F, D)
    act = np.empty((P, F), np.float32)  # [P, F]
    _activate(gate_up, expert_of, slots, second_slots, b13, b13_second, has_bias, bf16, activation, alpha, limit, act)
    y = np.empty((P, D), np.float32)  # [P, D]
    _project(w2, w2_second, slots, second_slots, experts, starts, counts, act, y, D, F)
    _combine(y, position, ids, weights, slots, second_slots, b2, b2_second, has_bias, bf16, weigh_bf16, out)


# ---------------------------------------------------------------------------------- launcher


def _elements(t: torch.Tensor) -> np.ndarray:
    """The elements of t's whole storage as a flat numpy array (bfloat16 as its uint16 bits)."""
    raw = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())  # [storage elements]
    if t.dtype == torch.bfloat16:
        return raw.view(torch.int16).numpy().view(np.uint16)
    return raw.numpy()


def _slot_blocks(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> tuple[np.ndarray, int, int]:
    """t: [S, *shape] slot-indexed -> (its storage's elements, element offset of slot 0, elements
    between slots), after checking that every slot's block is contiguous."""
    if tuple(t.shape[1:]) != shape or not t[0].is_contiguous():
        raise ValueError(
            f"host experts {name}: expected [S, {', '.join(map(str, shape))}] with each slot's block "
            f"contiguous, found {list(t.shape)} with strides {list(t.stride())}"
        )
    return _elements(t), t.storage_offset(), t.stride(0)


# _buffers' result for the tensors still alive: a decode step passes every layer the same slot
# buffers, and building their views took ~40 us a layer call; keyed by the tensors' ids, dropped
# when any of them dies (before its id can name another tensor)
_BUFFERS: dict[tuple, tuple] = {}


def _kept_buffers(w13, w2, b13, b2, S, F2, D, F) -> tuple:
    """_buffers(...), built once per set of tensors while they live."""
    tensors = tuple(t for t in (w13, w2, b13, b2) if t is not None)
    key = tuple(id(t) for t in tensors) + (S, F2, D, F)
    found = _BUFFERS.get(key)
    if found is None:
        found = _BUFFERS[key] = _buffers(w13, w2, b13, b2, S, F2, D, F)
        for t in tensors:
            weakref.finalize(t, _BUFFERS.pop, key, None)
    return found


def _buffers(w13, w2, b13, b2, S, F2, D, F) -> tuple:
    """(flat, offset, stride) of w13, w2, b13, b2 in one slot buffer; without biases, stand-ins
    of the weights' type that are never read."""
    flat13 = _slot_blocks("w13", w13, (F2, D))
    flat2 = _slot_blocks("w2", w2, (D, F))
    if b13 is None:
        return flat13, flat2, (flat2[0][:1], 0, 0), (flat2[0][:1], 0, 0)
    bias13 = _slot_blocks("b13", b13.reshape(S, 1, F2), (1, F2))
    return flat13, flat2, bias13, _slot_blocks("b2", b2.reshape(S, 1, D), (1, D))


def slot_buffers(w13: torch.Tensor, w2: torch.Tensor) -> tuple:
    """(w13, w2, stand-in bias) as moe_layer_rows takes them, for slot buffers without biases
    (w13 [S, 2F, D], w2 [S, D, F], each slot's block contiguous), kept while the tensors live."""
    S, F2, D = w13.shape
    return _kept_buffers(w13, w2, None, None, S, F2, D, F2 // 2)[:3]


@functools.cache
def _no_second_buffer(E: int) -> np.ndarray:
    """[E] int64 all -1: no expert read from a second buffer (the kernels never write it)."""
    return np.full(E, -1, np.int64)


@dataclass(frozen=True)
class SecondBuffers:
    """Slot-indexed expert weights in a second buffer (the host tier's records), beside the slots:
    slots [E] int64 where each expert sits in it (-1: not there, read from the first buffer);
    w13 [H, 2F, D], w2 [H, D, F], b13 [H, 2F], b2 [H, D] (both biases or neither), as the first
    (float tensors here; QuantizedMatrix, with input_perm [H, D] for act-order records, where the
    first are quantized: host_quant_experts.py reads those)."""

    slots: torch.Tensor
    w13: torch.Tensor | QuantizedMatrix
    w2: torch.Tensor | QuantizedMatrix
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    # where the host share runs beside the device's when the two are different memories
    # (kernels/hybrid_experts.py; None: inline)
    worker: Executor | None = None
    input_perm: torch.Tensor | None = None


def applies(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> bool:
    """Whether these kernels run these inputs: CPU tensors of a supported dtype, x's and the weights'
    dtypes alike, a decode-sized step, and each slot's block of every weight contiguous."""
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and w13.dtype == w2.dtype == x.dtype
        and x.shape[0] <= MAX_TOKENS
        and all(w is None or _slots_contiguous(w) for w in (w13, w2, b13, b2))
    )


def _slots_contiguous(t: torch.Tensor) -> bool:
    """Whether each slot's block of t [S, ...] is contiguous (t[0].is_contiguous(), without the view)."""
    expected = 1
    for size, step in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def host_moe_experts(
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
    second: SecondBuffers | None = None,
) -> torch.Tensor:
    """moe_experts_reference's contract (see there), on the CPU: x [T, D] -> [T, D] in x's dtype.
    second: experts read from a second buffer instead of the slots (those with second.slots >= 0),
    computed exactly as they would be from a slot."""
    expect_both_biases_or_neither("host_moe_experts", b13, b2)
    T, D = x.shape
    S, F2, _ = w13.shape
    F = F2 // 2
    if x.dtype not in DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(
            f"host experts: expected x and weights all float32 or all bfloat16, found x {x.dtype}, "
            f"w13 {w13.dtype}, w2 {w2.dtype}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(
            f"host experts: expected topk_ids and topk_weights [{T}, K], found {list(topk_ids.shape)} and "
            f"{list(topk_weights.shape)}"
        )
    first = _kept_buffers(w13, w2, b13, b2, S, F2, D, F)
    if second is None:
        second_slots, second_buffers = _no_second_buffer(expert_slots.shape[0]), first
    else:
        expect_both_biases_or_neither("host_moe_experts second", second.b13, second.b2)
        if (second.b13 is None) != (b13 is None) or second.w13.dtype != w13.dtype:
            raise ValueError(
                f"host experts: expected the second buffers in the slots' dtype {w13.dtype} and with biases as they "
                f"have ({b13 is not None}), found {second.w13.dtype} and biases {second.b13 is not None}"
            )
        second_slots = second.slots.numpy()
        second_buffers = _kept_buffers(second.w13, second.w2, second.b13, second.b2, second.w13.shape[0], F2, D, F)
    out = empty_like_elements((T, D), x.dtype)
    moe_layer_rows(
        as_numpy(x), topk_ids.numpy(), as_numpy(topk_weights), expert_slots.numpy(), second_slots,
        first[0], second_buffers[0], first[1], second_buffers[1], first[2], second_buffers[2], first[3],
        second_buffers[3], b13 is not None, x.dtype == torch.bfloat16, topk_weights.dtype == torch.bfloat16,
        ACTIVATIONS[activation.kind], np.float32(activation.alpha), np.float32(activation.limit), F, out,
    )  # fmt: skip
    return as_tensor(out)
