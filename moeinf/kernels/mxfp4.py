"""MXFP4, the OCP microscaling 4-bit float format GPT-OSS ships its experts in, dequantized on load.

A row of K weights is stored as K / 32 blocks of 32 values: 16 bytes holding two FP4 (e2m1) codes
each, the even element in the low nibble, and one uint8 scale per block, a power of two with
exponent bias 127. The store and the device slots hold experts dequantized to the compute dtype,
so nothing downstream of the loader knows the checkpoint was quantized.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BLOCK_BYTES = BLOCK // 2
SCALE_BIAS = 127
# e2m1 code -> value: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks: [..., G, 16] uint8; scales: [..., G] uint8 -> [..., G * 32] float32 (exact: every
    MXFP4 value is a float32)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4: expected uint8 blocks and scales, found {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4: expected blocks [..., G, {BLOCK_BYTES}] and scales [..., G], found {list(blocks.shape)} and "
            f"{list(scales.shape)}"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    values = values.reshape(*scales.shape, BLOCK)  # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - SCALE_BIAS)
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)
