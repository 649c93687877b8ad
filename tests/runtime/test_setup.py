"""How an LLM's settings resolve: dtype "auto" is the checkpoint's own on CUDA, float32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from moeinf.errors import RequestError
from moeinf.runtime.setup import resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "checkpoint_dtype, device, expected",
    [
        ("bfloat16", CPU, torch.float32),  # measured faster than bf16 on the CPU (see resolve_dtype)
        ("float32", CPU, torch.float32),
        ("float16", CPU, torch.float32),
        ("float16", CUDA, torch.float16),
        ("bfloat16", CUDA, torch.bfloat16),
        ("float8_e4m3fn", CUDA, torch.float32),  # a storage format, not a compute dtype
    ],
)
def test_auto_dtype_is_the_checkpoints_on_cuda_and_float32_on_the_cpu(checkpoint_dtype, device, expected):
    assert resolve_dtype("auto", checkpoint_dtype, device) == expected


def test_an_explicit_dtype_wins_and_an_unknown_one_is_named():
    assert resolve_dtype("float32", "bfloat16", CPU) == torch.float32
    with pytest.raises(RequestError, match="expected dtype one of auto, float32.*found 'fp64'"):
        resolve_dtype("fp64", "bfloat16", CPU)
