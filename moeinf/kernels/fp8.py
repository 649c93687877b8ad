"""Fine-grained FP8, the format DeepSeek-V3 and Qwen3's FP8 releases ship their linear weights in,
dequantized on load.

A weight [N, K] is stored as float8_e4m3fn beside `<name>_scale_inv` [ceil(N / bn), ceil(K / bk)]:
the weight of block (i, j) is its FP8 values times scale_inv[i, j] ("inverse": the quantizer
divided by it). The runtime computes in the compute dtype with the dequantized weights, as
transformers does with dequantize=True.
"""

from __future__ import annotations

import torch

FP8_DTYPE = "F8_E4M3"  # the safetensors dtype of the packed weights
SCALE_SUFFIX = "_scale_inv"


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale_inv shape of a weight [N, K] in blocks of block = (bn, bk)."""
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight: [N, K] float8; scale_inv: [ceil(N / bn), ceil(K / bk)] -> [N, K] float32."""
    if weight.dim() != 2 or tuple(scale_inv.shape) != scale_shape(tuple(weight.shape), block):
        raise ValueError(
            f"FP8: expected a [N, K] weight and scale_inv {list(scale_shape(tuple(weight.shape[-2:]), block))} for "
            f"blocks {list(block)}, found weight {list(weight.shape)} and scale_inv {list(scale_inv.shape)}"
        )
    rows, cols = weight.shape
    scale = scale_inv.to(torch.float32).repeat_interleave(block[0], dim=0)[:rows]  # [N, ceil(K / bk)]
    scale = scale.repeat_interleave(block[1], dim=1)[:, :cols]  # [N, K]
    return weight.to(torch.float32) * scale
