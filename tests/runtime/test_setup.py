"""How an LLM's settings resolve: dtype "auto" is the checkpoint's own on CUDA and, for bfloat16, on a
CPU with bfloat16 instructions; float32 on other CPUs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from moeinf import LLM
from moeinf.errors import RequestError
from moeinf.runtime.setup import cpu_has_bf16_instructions, resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "checkpoint_dtype, device, cpu_bf16, expected",
    [
        ("bfloat16", CPU, False, torch.float32),  # its prefill runs at half speed without bf16 instructions
        ("bfloat16", CPU, True, torch.bfloat16),
        ("float32", CPU, True, torch.float32),
        ("float16", CPU, True, torch.float32),  # no host kernels for float16
        ("float16", CUDA, False, torch.float16),
        ("bfloat16", CUDA, False, torch.bfloat16),
        ("float8_e4m3fn", CUDA, False, torch.float32),  # a storage format, not a compute dtype
    ],
)
def test_auto_dtype_is_the_checkpoints_on_cuda_and_on_a_cpu_with_bf16_instructions(
    checkpoint_dtype, device, cpu_bf16, expected
):
    assert resolve_dtype("auto", checkpoint_dtype, device, cpu_bf16) == expected


def test_auto_dtype_asks_this_cpu_when_not_told():
    expected = torch.bfloat16 if cpu_has_bf16_instructions() else torch.float32
    assert resolve_dtype("auto", "bfloat16", CPU) == expected


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


def test_host_budget_is_auto_by_default():
    from moeinf.runtime.setup import OffloadConfig

    assert OffloadConfig().host_budget == "auto"
    assert inspect.signature(LLM).parameters["host_budget"].default == "auto"


@pytest.mark.parametrize("device", ["tpu", "", "cuda:x", "cpu,cuda", "meta", 3, None])
def test_an_unknown_device_is_named(device):
    from moeinf.runtime.setup import resolve_device

    with pytest.raises(RequestError, match=r"expected device 'cpu' or 'cuda'.*, found " + re.escape(repr(device))):
        resolve_device(device)


def test_a_cuda_index_beyond_the_devices_is_named():
    from moeinf.runtime.setup import resolve_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = f"cuda:{count}" if count else "no CUDA device"
    with pytest.raises(RequestError, match=expected):
        resolve_device(f"cuda:{count}")


def unwritable_places(tmp_path: Path) -> list[tuple[Path, str]]:
    """Folders no build can write, even as root: (path, what the error names)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return [
        (a_file, "a file"),
        (a_file / "below", "Not a directory"),
        (Path("/sys/kernel/moeinf-store"), "Operation not permitted|Permission denied|Read-only"),
        (Path("/proc/self"), "No such file|Permission denied|Operation not permitted"),  # a folder, but not writable
    ]


def test_an_offload_dir_that_cannot_hold_the_store_is_named(tiny_mixtral, tmp_path):
    from moeinf import LLM
    from moeinf.errors import OffloadConfigError

    folder, _ = tiny_mixtral
    for place, why in unwritable_places(tmp_path):
        with pytest.raises(OffloadConfigError, match=rf"expected a folder .*found {re.escape(str(place))}.*({why})"):
            LLM(folder, progress=False, expert_budget=0.5, offload_dir=place)
    assert (tmp_path / "a-file").read_text() == "not a folder"  # nothing the user had is touched


def test_a_cache_dir_that_is_a_file_is_named_where_the_store_needs_it(tiny_mixtral, tmp_path, monkeypatch):
    from moeinf import LLM
    from moeinf.errors import CacheDirError

    folder, _ = tiny_mixtral
    for place, why in unwritable_places(tmp_path)[:3]:
        monkeypatch.setenv("MOEINF_CACHE_DIR", str(place))
        with pytest.raises(
            CacheDirError,
            match=rf"MOEINF_CACHE_DIR: expected the cache directory to be a folder.*found {re.escape(str(place))}",
        ):
            LLM(folder, progress=False, expert_budget=0.5)
