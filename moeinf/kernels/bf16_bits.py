"""bfloat16 elements inside the host (Numba) kernels: numpy has no bfloat16, so the kernels see a
bfloat16 tensor as its uint16 bits, widen each element to float32 exactly, compute in float32, and
round back where the torch reference's bfloat16 tensors round (round to nearest even, torch's rule).

Each helper also takes float32 (and is then the identity), so one kernel body compiles for float32
and bfloat16 arrays alike. Numba caches a kernel by its own file and does not see an edit here:
after changing this file, clear the `__pycache__/*.nb*` entries of the kernels that use it.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


@intrinsic
def bits_to_float32(typingctx, bits):
    """uint32 -> the float32 with those bits."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def float32_to_bits(typingctx, value):
    """float32 -> its bits as uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def widen(value):
    """An element as float32: bfloat16 bits (uint16) shifted into float32's upper half, exactly."""
    raise NotImplementedError("compiled only: see the overload below")


@overload(widen, inline="always")
def _widen_impl(value):
    if value == types.uint16:
        return lambda value: bits_to_float32(np.uint32(np.uint32(value) << np.uint32(16)))
    if value == types.float32:
        return lambda value: value
    return None


@njit(inline="always")
def round_bf16(value):
    """float32 -> the nearest bfloat16 (ties to even), as float32; NaN stays NaN (torch's rule)."""
    if value != value:
        return value
    bits = float32_to_bits(value)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits_to_float32(np.uint32(bits))  # numba widens uint32 arithmetic to uint64


@njit(inline="always")
def rounded(value, bf16):
    """value rounded to bfloat16 where bf16, else as it is (float32)."""
    return round_bf16(value) if bf16 else value


def narrow(value, like):
    """float32 value as an element of an array whose elements are like `like`: bfloat16 bits (the
    value rounded to nearest even) for uint16, the value itself for float32."""
    raise NotImplementedError("compiled only: see the overload below")


@njit
def _bf16_bits(value):
    """float32 -> the bits of its nearest bfloat16; NaN -> the quiet NaN torch writes."""
    if value != value:
        return np.uint16(0x7FC0)
    return np.uint16(float32_to_bits(round_bf16(value)) >> np.uint32(16))


@overload(narrow, inline="always")
def _narrow_impl(value, like):
    if like == types.uint16:
        return lambda value, like: _bf16_bits(value)
    if like == types.float32:
        return lambda value, like: value
    return None


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array the kernels take, sharing its memory: bfloat16 as its uint16 bits."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def empty_like_elements(shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """An uninitialised array for a kernel to write a `dtype` tensor into (float32, or bfloat16 bits)."""
    return np.empty(shape, np.uint16 if dtype == torch.bfloat16 else np.float32)


def as_tensor(elements: np.ndarray) -> torch.Tensor:
    """The tensor of a kernel's output array, sharing its memory: uint16 bits as bfloat16."""
    t = torch.from_numpy(elements)
    return t.view(torch.bfloat16) if elements.dtype == np.uint16 else t
