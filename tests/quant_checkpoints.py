"""Quantized weights for tests, written from each format's definition rather than with moeinf's
readers: a GPTQ packer (AutoGPTQ's pack loops), random GPTQ weights with the float weights they
stand for, and compressed-tensors' own compressor for pack-quantized weights."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch


class GPTQWeight(NamedTuple):
    codes: torch.Tensor  # [N, K] int64 in 0..2^bits - 1
    zeros: torch.Tensor  # [N, K / G] int64 in 0..2^bits - 1
    scales: torch.Tensor  # [N, K / G] float16 / bfloat16
    g_idx: torch.Tensor  # [K] int32: the group of each input
    weight: torch.Tensor  # [N, K] float32: W[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g], g = g_idx[k]


def random_gptq(
    rows: int,
    cols: int,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> GPTQWeight:
    """Random integer codes, zeros (the midpoint when sym) and scales, and the exact float weights
    they define. desc_act shuffles which inputs form each group, as GPTQ's act order does: input
    order[i] lands in group i // G for a random permutation `order`."""
    gen = torch.Generator().manual_seed(seed)
    group = cols if group_size == -1 else group_size
    groups = cols // group
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    if sym:
        zeros = torch.full((rows, groups), 1 << (bits - 1), dtype=torch.int64)
    else:
        zeros = torch.randint(0, 1 << bits, (rows, groups), generator=gen)
    scales = (torch.rand(rows, groups, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    g_idx = torch.arange(cols) // group
    if desc_act:
        order = torch.randperm(cols, generator=gen)
        g_idx = torch.empty(cols, dtype=torch.int64)
        g_idx[order] = torch.arange(cols) // group
    # float64 holds the product of a <= 8-bit integer and a 16-bit float exactly, so does float32
    weight = (codes - zeros[:, g_idx]).to(torch.float64) * scales[:, g_idx].to(torch.float64)
    return GPTQWeight(codes, zeros, scales, g_idx.to(torch.int32), weight.to(torch.float32))


def pack_gptq(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """codes [N, K], zeros and scales [N, K / G] -> the tensors of a GPTQ linear, packed as AutoGPTQ's
    QuantLinear.pack does: qweight [K * bits / 32, N] with input (32 / bits) * r + j in bits
    [bits * j, bits * (j + 1)) of row r, qzeros [K / G, N * bits / 32] likewise along N, holding
    zero - 1 in the v1 format ("gptq"), masked to `bits` bits (AutoGPTQ's own packer let a zero of 0
    overflow into its neighbours; a clean v1 writer stores 2^bits - 1, which its reader decodes
    back to 0), and zero itself in "gptq_v2"."""
    per = 32 // bits
    mask = (1 << bits) - 1
    intweight = codes.T.numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << np.uint32(bits * j)
    stored = zeros.T.numpy().astype(np.int64)  # [K / G, N]
    if checkpoint_format == "gptq":
        stored = (stored - 1) & mask
    stored = stored.astype(np.uint32)
    qzeros = np.zeros((stored.shape[0], stored.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= stored[:, col * per + j] << np.uint32(bits * j)
    out = {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": scales.T.contiguous(),
    }
    if g_idx is not None:
        out["g_idx"] = g_idx.to(torch.int32)
    return out


def ct_scheme(bits: int, group_size: int | None, symmetric: bool, actorder: Any = None):
    """A compressed-tensors weight-only int scheme (W4A16 / W8A16 style) for Linear modules."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="group" if group_size else "channel",
        group_size=group_size,
        actorder=actorder,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def ct_compress(weight: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """A float weight [N, K] quantized with min-max scales (compressed-tensors' calculate_qparams)
    and packed by compressed-tensors' PackedQuantizationCompressor, as llm-compressor saves it."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    if args.group_size:
        grouped = weight.reshape(weight.shape[0], -1, args.group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
    else:
        low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    scale, zero_point = calculate_qparams(low, high, args)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    return PackedQuantizationCompressor.compress(state, scheme)


def ct_decompress(state: dict[str, torch.Tensor], scheme, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """compressed-tensors' own decompressor; scale_dtype recasts weight_scale first (float32: the
    products come out unrounded)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    if scale_dtype is not None:
        state = {**state, "weight_scale": state["weight_scale"].to(scale_dtype)}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]
