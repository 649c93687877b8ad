"""How an LLM's settings resolve: dtype "auto" is the checkpoint's own where the device runs it well."""

from __future__ import annotations

import pytest
import torch

from moeinf import LLM
from moeinf.errors import RequestError
from moeinf.runtime.setup import resolve_dtype
from tests.checkpoints import save_tiny_mixtral

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "checkpoint_dtype, device, expected",
    [
        ("bfloat16", CPU, torch.bfloat16),  # the host kernels read bf16 at memory bandwidth
        ("float32", CPU, torch.float32),
        ("float16", CPU, torch.float32),  # no host kernel for fp16: float32
        ("float16", CUDA, torch.float16),
        ("bfloat16", CUDA, torch.bfloat16),
        ("float8_e4m3fn", CUDA, torch.float32),  # a storage format, not a compute dtype
    ],
)
def test_auto_dtype_is_the_checkpoints_where_the_device_computes_it(checkpoint_dtype, device, expected):
    assert resolve_dtype("auto", checkpoint_dtype, device) == expected


def test_an_explicit_dtype_wins_and_an_unknown_one_is_named():
    assert resolve_dtype("float32", "bfloat16", CPU) == torch.float32
    with pytest.raises(RequestError, match="expected dtype one of auto, float32.*found 'fp64'"):
        resolve_dtype("fp64", "bfloat16", CPU)


def test_a_bfloat16_checkpoint_runs_in_bfloat16_on_the_cpu_by_default(tmp_path):
    save_tiny_mixtral(tmp_path).to(torch.bfloat16).save_pretrained(tmp_path)
    with LLM(tmp_path, device="cpu", progress=False) as auto, LLM(tmp_path, device="cpu", dtype="bfloat16", progress=False) as bf16:
        assert auto.dtype == torch.bfloat16
        assert torch.equal(auto.logits([1, 5, 9, 3]), bf16.logits([1, 5, 9, 3]))
