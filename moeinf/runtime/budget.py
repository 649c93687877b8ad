"""Memory budgets as users write them -> a number of expert slots.

A budget is a fraction of all expert bytes (0.25), a byte size ("2GiB", "512MB", "1.5G"), a
percentage ("25%"), or a slot count (an int). None means everything.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moeinf.errors import OffloadConfigError
from moeinf.runtime.policies import DEFAULT_POLICY

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
        raise OffloadConfigError(
            f"{what}: expected a byte size such as '2GiB', '512MB' or '25%', found {value!r}"
        )
    raise OffloadConfigError(f"{what}: expected a fraction, a byte size or a slot count, found {type(value).__name__}")


@dataclass(frozen=True)
class OffloadConfig:
    """Where experts live. The defaults keep every expert resident on the compute device."""

    expert_budget: Budget = None  # device slots
    host_budget: Budget = 0  # host-memory cache of expert records in front of the disk store
    offload_dir: str | None = None  # packed expert store; default: under the cache directory
    policy: str = DEFAULT_POLICY  # which experts to evict and prefetch; see runtime/policies.py
    io_threads: int = 2  # store reads in flight at once
