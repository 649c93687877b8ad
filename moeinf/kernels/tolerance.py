"""How near a kernel's output must come to its torch reference (reference.py): the relative RMS error,
and the largest one accepted per dtype. The kernel tests, the GPU tests, bench/kernels.py and
bench/tune_moe.py all judge outputs by these, so a kernel the tuner accepts is one the tests accept."""

from __future__ import annotations

import torch

# Relative RMS error accepted against a float64 evaluation of the reference on the same (rounded)
# inputs, at the tests' toy shapes (hidden and expert ffn of a few dozen to a few hundred).
# float32: a few float32 roundings (2^-24 each) per element. float16 and bfloat16: rounding the
# inputs, the activation and the output to the low-precision dtype, one ulp each at most; the sums
# accumulate in float32 and add next to nothing. bfloat16's is the loosest: the Triton interpreter
# upcasts bfloat16 arithmetic to float32 (its own bf16 arithmetic is wrong) and its float32 -> bf16
# casts truncate instead of rounding to nearest, so each rounding costs up to a whole ulp (2^-8).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# At real model shapes (Mixtral's D = 4096 and F = 14336) the float32 rounding of a sum of n terms
# grows about as sqrt(n), past what the toy shapes' 1e-5 leaves room for: float32 gets 2e-5 there.
# The low-precision dtypes keep their toy values: their error is the per-element rounding to the
# dtype, whatever the length of the float32 sums. The GPU tests and the tuner run at these shapes.
MODEL_SHAPE_TOLERANCE = {**TOLERANCE, torch.float32: 2e-5}


def rel_rms(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error of `got` against `expected`: sqrt(mean((got - expected)^2) / mean(expected^2)),
    both evaluated in float64 on the CPU. A NaN in `got` gives NaN, which fails every `< tolerance`
    (and `<= tolerance`) check."""
    got = got.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    return ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()
