"""What the CPU benchmarks share (e2e, offload_decode, store_reads; kernels and tune_moe for their CSV):
the machine header of their results, a seeded random prompt, how busy the rest of the machine kept
its CPUs, and the results files, JSON and CSV, written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.machine import cpu_model, load_average
from moeinf.atomic_write import write_text_atomic

SPECIAL_IDS = 3  # ids 0, 1, 2 (<unk>, <s>, </s>) are never used in the prompt
MB, GB = 1e6, 1e9  # the benchmarks' units: MB = 1e6 bytes, GB/s = 1e9 bytes per second


def machine_info(**versions: str) -> dict:
    """What the numbers were measured on; `versions`: more libraries' versions, beside torch's."""
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **versions,
        "python": platform.python_version(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


def make_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """`length` seeded random token ids in [SPECIAL_IDS, vocab_size): no <unk>, <s> or </s>."""
    rng = random.Random(seed)
    return [rng.randrange(SPECIAL_IDS, vocab_size) for _ in range(length)]


def cpu_snapshot() -> tuple[float, float | None, float]:
    """(wall s, CPU-busy s of the whole machine from /proc/stat or None, CPU s of this process)."""
    busy = None
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        pass
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system


def background_cpu(before: tuple, after: tuple) -> float | None:
    """Share of the machine's CPUs that other processes kept busy between two cpu_snapshot()s."""
    wall = after[0] - before[0]
    if before[1] is None or after[1] is None or wall <= 0:
        return None
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other / (wall * (os.cpu_count() or 1)))


def warn_if_busy(machine: dict, limit: float = 0.2) -> None:
    """Warns when other processes kept more than `limit` of the CPUs busy over the whole benchmark
    (machine["background_cpu_share"], from background_cpu)."""
    background = machine["background_cpu_share"]
    if background is not None and background > limit:
        print(
            f"WARNING: other processes kept {background:.0%} of the CPUs busy over the whole benchmark; "
            "the rates are lower than on an idle machine",
            file=sys.stderr,
        )


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or 'n/a' for None."""
    return "n/a" if value is None else format(value, spec)


def csv_text(columns: Iterable[str], rows: Iterable[dict]) -> str:
    """A header of `columns`, then one line per row; a column a row lacks is left empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(out: Path, name: str, results: dict, csv_rows: str) -> None:
    """<out>/<name>.json (the results object) and <out>/<name>.csv (`csv_rows`), each atomically."""
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    write_text_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(csv_path, csv_rows)
    print(f"wrote {json_path} and {csv_path}")
