"""What LLM's arguments turn into: the device, the compute dtype, the kernels, and the expert source
(every expert resident, or a pool of slots over the packed store, run by a cache policy).

Memory budgets are written as a fraction of all expert bytes (0.25), a byte size ("2GiB",
"512MB", "1.5G"), a percentage ("25%"), or a slot count (an int); None means everything.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moeinf.errors import OffloadConfigError, RequestError
from moeinf.kernels.block_configs import interpreting
from moeinf.kernels.ops import KERNEL_CHOICES, Kernels
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.default_model import cache_dir
from moeinf.loaders.expert_format import ExpertFormat, resolve_expert_format
from moeinf.loaders.expert_record import RecordLayout
from moeinf.loaders.expert_store import ExpertStore
from moeinf.runtime.cache.placement import HOST_COMPUTE_CHOICES
from moeinf.runtime.cache.registry import DEFAULT_POLICY, make_policy
from moeinf.runtime.experts.pool import ExpertPool
from moeinf.runtime.experts.resident import ResidentExperts
from moeinf.runtime.experts.source import ExpertSource

Budget = int | float | str | None

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_budget(value: Budget, expert_nbytes: int, total_experts: int, what: str = "expert_budget") -> int:
    """Slots (whole experts) that `value` affords, at most `total_experts`."""
    if value is None:
        return total_experts
    if isinstance(value, bool):
        raise OffloadConfigError(f"{what}: expected a fraction, a byte size or a slot count, found {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise OffloadConfigError(f"{what}: expected a slot count >= 0, found {value}")
        return min(value, total_experts)
    if isinstance(value, float):
        if not 0 <= value <= 1:
            raise OffloadConfigError(f"{what}: expected a fraction of all expert bytes in [0, 1], found {value}")
        return math.floor(value * total_experts + 1e-9)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                return parse_budget(float(text[:-1]) / 100, expert_nbytes, total_experts, what)
            except ValueError:
                pass
        match = _SIZE.match(text)
        if match and match.group(2).lower() in _UNITS:
            nbytes = float(match.group(1)) * _UNITS[match.group(2).lower()]
            return min(int(nbytes // expert_nbytes), total_experts)
        raise OffloadConfigError(f"{what}: expected a byte size such as '2GiB', '512MB' or '25%', found {value!r}")
    raise OffloadConfigError(f"{what}: expected a fraction, a byte size or a slot count, found {type(value).__name__}")


@dataclass(frozen=True)
class OffloadConfig:
    """Where experts live. The defaults keep every expert resident on the compute device."""

    expert_budget: Budget = None  # device slots
    # host-memory cache of expert records in front of the disk store; "auto": on CUDA as much as
    # host_tier_records affords, on the CPU none (the slots are host memory already)
    host_budget: Budget = "auto"
    offload_dir: str | None = None  # packed expert store; default: under the cache directory
    policy: str = DEFAULT_POLICY  # which experts to evict and prefetch; see runtime/cache/registry.py
    io_threads: int = 2  # store reads in flight at once
    # where a miss is computed (runtime/cache/placement.py): "never" fetches every one into a slot;
    # "always" / "auto" may compute it on the host from the host tier (needs a host_budget of at
    # least one layer's experts, without which "auto" fetches)
    host_compute: str = "auto"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or such a torch.device) that this machine has; RequestError else."""
    expected = "expected device 'cpu' or 'cuda' (or 'cuda:N')"
    if not isinstance(device, (str, torch.device)):
        raise RequestError(f"{expected}, found {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError:  # torch's own message lists every device type it knows
        raise RequestError(f"{expected}, found {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise RequestError(f"{expected}, found {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device 'cuda' was requested, but torch sees no CUDA device on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RequestError(
            f"expected a CUDA device index below the {torch.cuda.device_count()} devices torch sees, found {str(device)!r}"
        )
    return device


def resolve_kernels(kernels: str, device: torch.device) -> Kernels:
    """'auto' runs the Triton kernels on CUDA and their torch references on the CPU; 'torch' the
    references everywhere; 'triton' the kernels everywhere, which on the CPU means Triton's
    interpreter (slow; how tests check the kernels inside the runtime without a GPU)."""
    if kernels not in KERNEL_CHOICES:
        raise RequestError(f"expected kernels one of {', '.join(KERNEL_CHOICES)}; found {kernels!r}")
    if kernels == "triton" and device.type == "cpu" and not interpreting():
        raise RequestError(
            "kernels='triton' on the CPU runs in Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
            "environment before triton is imported; found it unset (use 'auto' or 'torch' on the CPU)"
        )
    return Kernels(kernels)


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as torch detects them)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check is not None and check() for check in checks)


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device, cpu_bf16: bool | None = None) -> torch.dtype:
    """'auto' computes in the checkpoint's own dtype on CUDA, and on the CPU in a bfloat16
    checkpoint's bfloat16 where the CPU has bfloat16 instructions (cpu_bf16; None: ask the CPU),
    float32 elsewhere. Measured on the default (bfloat16) model on a CPU without them (Skylake-SP,
    2 threads, paired rounds): bfloat16 decode now runs faster than float32 (22.2 against 25.4 ms
    a token: the host kernels read half the bytes and keep its dense side off torch's slow bfloat16
    ops), but its prefill runs at half float32's speed (516 against 264 ms for 128 tokens), in
    torch's bfloat16 matmuls and attention, which such a CPU emulates; with the instructions those
    run at least as fast as float32's, and bfloat16 halves the memory and the bytes each token reads."""
    if dtype == "auto":
        native = cpu_has_bf16_instructions() if cpu_bf16 is None else cpu_bf16
        keeps_bf16 = device.type == "cpu" and checkpoint_dtype == "bfloat16" and native
        dtype = checkpoint_dtype if (device.type == "cuda" and checkpoint_dtype in DTYPES) or keeps_bf16 else "float32"
    if dtype not in DTYPES:
        raise RequestError(f"expected dtype one of auto, {', '.join(DTYPES)}; found {dtype!r}")
    return DTYPES[dtype]


def available_host_bytes() -> int:
    """Host memory the kernel says can still be allocated without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


HOST_AUTO_SHARE = 0.5  # of the available host memory that host_budget="auto" takes on CUDA


def host_tier_records(value: Budget, expert_nbytes: int, total: int, device: torch.device) -> int:
    """Expert records the host tier holds. "auto": on CUDA as many as HOST_AUTO_SHARE of the
    available host memory affords (at most every expert); on the CPU none, since the device slots
    are host memory already. A given budget that the available memory cannot hold is an error."""
    available = available_host_bytes()
    if value == "auto":
        return min(total, int(available * HOST_AUTO_SHARE) // expert_nbytes) if device.type == "cuda" else 0
    records = parse_budget(value, expert_nbytes, total, "host_budget")
    if records * expert_nbytes > available:
        raise OffloadConfigError(
            f"host_budget {value!r}: expected at most the {available / 2**30:.1f} GiB of host memory available, "
            f"found {records} expert records of {expert_nbytes / 2**20:.1f} MiB = {records * expert_nbytes / 2**30:.1f} GiB"
        )
    return records


def expert_format_for(checkpoint: Checkpoint, expert_dtype: str, dtype: torch.dtype) -> ExpertFormat:
    """expert_dtype -> the records' format (loaders/expert_format.py). "auto" keeps a GPTQ /
    compressed-tensors checkpoint's own expert packing (its ConfigError, where the runtime has no
    records for that packing, tells to choose one); any other choice never asks for it."""
    native = checkpoint.native_expert_format() if expert_dtype == "auto" else None
    return resolve_expert_format(expert_dtype, dtype, native)


def default_store_dir(checkpoint: Checkpoint) -> Path:
    """One store folder per checkpoint folder, under the cache directory."""
    digest = hashlib.sha1(str(checkpoint.path.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "stores" / f"{checkpoint.path.name}-{digest}"


def build_expert_source(
    checkpoint: Checkpoint,
    offload: OffloadConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    max_batch_tokens: int | None,
    fmt: ExpertFormat | None = None,
) -> ExpertSource:
    """Every expert resident when the budget affords them all; else a pool of slots over the store,
    run by the configured policy. fmt: the experts' record format (None: float in `dtype`); budgets
    count its bytes."""
    spec = checkpoint.spec
    if offload.host_compute not in HOST_COMPUTE_CHOICES:
        choices = ", ".join(HOST_COMPUTE_CHOICES)
        raise OffloadConfigError(f"host_compute: expected one of {choices}, found {offload.host_compute!r}")
    fmt = fmt or ExpertFormat.float(dtype)
    total = spec.num_moe_layers * spec.num_experts
    layout = RecordLayout.for_format(spec.hidden_size, spec.expert_ffn, fmt, biases=spec.expert_bias)
    expert_nbytes = layout.payload_nbytes
    slots = parse_budget(offload.expert_budget, expert_nbytes, total, "expert_budget")
    policy = make_policy(offload.policy, spec.num_moe_layers, spec.num_experts)
    if slots >= total:
        return ResidentExperts(checkpoint, device, dtype, progress, fmt)
    # A layer computes only with all its routed experts resident at once: one step's tokens route
    # to at most top_k each, and without max_batch_tokens a prefill can reach every expert.
    minimum = spec.num_experts
    if max_batch_tokens is not None:
        minimum = min(minimum, spec.top_k * max_batch_tokens)
    if slots < minimum:
        raise OffloadConfigError(
            f"expert_budget {offload.expert_budget!r} affords {slots} expert slots; the minimum is {minimum} "
            f"(one layer's experts for a step of {max_batch_tokens or 'any number of'} tokens, "
            f"{minimum * expert_nbytes / 2**20:.1f} MiB in {fmt.name})"
        )
    host_records = host_tier_records(offload.host_budget, expert_nbytes, total, device)
    if offload.io_threads < 1:
        raise OffloadConfigError(f"io_threads: expected >= 1, found {offload.io_threads}")
    store_dir = Path(offload.offload_dir) if offload.offload_dir else default_store_dir(checkpoint)
    store = ExpertStore.open_or_build(checkpoint, store_dir, fmt, progress=progress)
    return ExpertPool(store, slots, host_records, device, dtype, policy, offload.io_threads, offload.host_compute)
