"""The packed expert store the offload benchmarks (offload_decode, store_reads) run against: a session
that opens the checkpoint and its store in a folder of their own on a real disk and records the
machine around it (the store's file system among it), and the store file's pages in the page cache,
which the benchmarks drop before each measurement so that reads come from the disk."""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import GB, MB, background_cpu, cpu_snapshot, machine_info
from bench.machine import load_average
from moeinf import ensure_default_model
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_store import ExpertStore


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --offload-dir: the checkpoint, and where its store goes."""
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument(
        "--offload-dir", type=Path, default=None,
        help="folder of the expert store (default: a temporary folder under the working directory, removed at the end)",
    )  # fmt: skip


@dataclass
class StoreSession:
    """One benchmark's checkpoint and its float32 expert store, open. machine: the results' machine
    header, where the store's file system is recorded, and the end-of-run load once the session ends."""

    path: Path  # the checkpoint folder
    checkpoint: Checkpoint
    folder: Path  # the store's folder
    temporary: bool  # the folder is removed when the session ends
    store: ExpertStore
    open_s: float  # seconds ExpertStore.open_or_build took (building the store, unless it was there)
    machine: dict

    def describe(self) -> str:
        """One line: where the store is, whether it was built, O_DIRECT, and its file system."""
        store, fs = self.store, self.machine["store_filesystem"]
        return (
            f"store {store.path} ({'built' if store.built else 'reused'} in {self.open_s:.1f} s, O_DIRECT "
            f"{'on' if store.direct else 'off'}) on {fs['type']} {fs['device']}"
            + (", a temporary folder removed at the end" if self.temporary else "")
        )

    def model_summary(self) -> dict:
        """The checkpoint's shape as the store holds it; expert_record_mb: one (layer, expert) record."""
        spec, store = self.checkpoint.spec, self.store
        return {"path": str(self.path), "num_layers": spec.num_layers, "moe_layers": store.num_layers,
                "num_experts": spec.num_experts, "top_k": spec.top_k, "hidden_size": spec.hidden_size,
                "expert_ffn": spec.expert_ffn, "expert_record_mb": store.layout.record_nbytes / MB}  # fmt: skip

    def store_summary(self) -> dict:
        store = self.store
        return {"path": str(store.path), "built": store.built, "open_or_build_s": self.open_s,
                "record_nbytes": store.layout.record_nbytes, "direct": store.direct}  # fmt: skip


@contextmanager
def store_session(model: Path | None, offload_dir: Path | None) -> Iterator[StoreSession]:
    """Opens the checkpoint (`model`, or moeinf's default model) and its store in `offload_dir`,
    building the store there unless one is already there. Without `offload_dir` the store goes to a
    temporary folder under the working directory, on its file system (a real disk, not a tmpfs
    /tmp), removed when the block ends. When the block ends the store is closed and the machine's
    load at the end, and the share of the CPUs other processes used meanwhile, are recorded."""
    path = model if model is not None else ensure_default_model()
    folder = offload_dir or Path(tempfile.mkdtemp(prefix=".offload-bench-", dir="."))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        checkpoint = Checkpoint.open(path)
        machine = {**machine_info(), "store_filesystem": filesystem_of(folder)}
        cpu_start = cpu_snapshot()
        start = time.perf_counter()
        store = ExpertStore.open_or_build(checkpoint, folder, torch.float32, progress=True)
        open_s = time.perf_counter() - start
        try:
            yield StoreSession(path, checkpoint, folder, offload_dir is None, store, open_s, machine)
        finally:
            store.close()
        machine["load_average_end"] = load_average()
        machine["background_cpu_share"] = background_cpu(cpu_start, cpu_snapshot())
    finally:
        if offload_dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def filesystem_of(path: Path) -> dict:
    """Device, file system type and mount point of `path` (from `df -T`), plus its free space."""
    info: dict = {"path": str(path.resolve())}
    try:
        out = (
            subprocess.run(["df", "-T", "-P", str(path)], capture_output=True, text=True, check=True, timeout=10)
            .stdout.splitlines()[-1]
            .split()
        )
        info.update(device=out[0], type=out[1], mount=out[-1])
    except (OSError, subprocess.SubprocessError, IndexError):
        info.update(device=None, type=None, mount=None)
    stat = os.statvfs(path)
    info["free_gb"] = round(stat.f_bavail * stat.f_frsize / GB, 1)
    return info


def drop_cached_pages(path: Path) -> None:
    """Asks the kernel to drop `path`'s clean pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> float | None:
    """Share of `path`'s pages in the page cache now (mincore(2)); None where it cannot be asked."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
