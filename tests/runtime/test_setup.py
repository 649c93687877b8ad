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


def test_host_budget_auto_sizes_the_tier_to_the_device_and_a_budget_beyond_memory_is_named():
    from moeinf.errors import OffloadConfigError
    from moeinf.runtime.setup import HOST_AUTO_SHARE, available_host_bytes, host_tier_records

    mib = 2**20
    assert host_tier_records("auto", mib, 10**9, CPU) == 0  # the CPU's slots are host memory already
    expected = min(10**9, int(available_host_bytes() * HOST_AUTO_SHARE) // mib)
    assert abs(host_tier_records("auto", mib, 10**9, CUDA) - expected) <= expected // 100 + 1
    assert host_tier_records(0.5, mib, 100, CPU) == 50
    with pytest.raises(OffloadConfigError, match=r"host_budget '100TiB': expected at most the .* GiB of host memory"):
        host_tier_records("100TiB", mib, 10**9, CPU)
