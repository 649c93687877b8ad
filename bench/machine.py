"""What every benchmark records beside its figures: the machine it ran on, and how loaded it was."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's 'model name' from /proc/cpuinfo, else platform.processor(), else 'unknown'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews the timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
