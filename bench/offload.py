"""Expert offloading benchmark on the CPU: the default model at several expert budgets, with the
packed expert store on disk, and the store's read throughput against a plain read of its file.

Run:  python bench/offload.py [--model DIR] [--budgets 0.25,0.5,1.0] [--policy lru]
                              [--prompt-tokens 64] [--new-tokens 32] [--repeats 3]
                              [--offload-dir DIR] [--seed 0] [--out bench/results]

Results go to <out>/offload-cpu.json and <out>/offload-cpu.csv, with the machine's description.

Part 1, generation. One LLM per budget (float32, CPU, expert_budget=budget, host_budget=0, the
store in --offload-dir; budget 1.0 keeps every expert resident and is the baseline). Each LLM gets
one warm-up generate, then R timed rounds; a round runs one generate per budget, and the budget
order flips every round so drift in machine load hits every budget alike. A generate is one
prompt of P seeded random token ids and exactly N new tokens (ignore_eos=True).
  prefill tok/s, decode tok/s: from the deltas of llm.stats() over the run (the engine's own timers)
  counters (hits, misses, bytes, stall_s): deltas of llm.stats() over the run, per phase from the
    engine's prefill_* and decode_* counters
  hit rate = (hits + prefetch_hits) / (hits + prefetch_hits + misses)
  stall share = decode stall_s / decode_s (the part of decode time spent waiting for expert loads)
  vs 1.0 = decode tok/s / decode tok/s at budget 1.0
  Each figure is the median over the R runs (counters too, run by run).

Part 2, reads of the store file (after part 1, its LLMs closed), R rounds, order flipping:
  plain: the whole file read front to back with buffered 8 MiB reads into one preallocated buffer
  store: ExpertStore.read_into of every record (layer, expert), shuffled, from a pool of
    io_threads (the runtime's default) workers, each into its own ALIGN-aligned buffer (O_DIRECT
    when store.direct); read_into includes its crc32 check, as the runtime pays it
  Before every measurement the file's pages are dropped from the page cache
  (posix_fadvise DONTNEED) and the share still cached is measured with mincore(2).
  ratio = store GB/s / plain GB/s, target >= 0.8.

Units: seconds (s), tokens per second (tok/s), MB = 1e6 bytes, GB/s = 1e9 bytes per second.
  P = --prompt-tokens, N = --new-tokens, R = --repeats; budgets are fractions of all expert bytes.
  bg cpu: share of the machine's CPUs that other processes used during a measurement (/proc/stat
  busy time minus this process's CPU time); other work on the machine skews every figure here.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import mmap
import os
import platform
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model, load_average, write_atomic  # bench/machine.py, beside this script
from tqdm import tqdm

from moeinf import LLM, SamplingParams, ensure_default_model
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_store import ExpertStore, aligned_buffer
from moeinf.runtime.engine import PHASE_COUNTERS
from moeinf.runtime.setup import OffloadConfig

SPECIAL_IDS = 3  # ids 0, 1, 2 (<unk>, <s>, </s>) are never used in the prompt
CHUNK = 8 * 2**20  # bytes per plain read
MB, GB = 1e6, 1e9
TARGET_RATIO = 0.8  # store GB/s / plain GB/s
COUNTERS = PHASE_COUNTERS  # expert traffic the engine counts per phase
PHASES = ("prefill", "decode")


# ----------------------------------------------------------------------------- machine


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


def machine_info(store_dir: Path) -> dict:
    """What the numbers were measured on, including where the store lives."""
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "store_filesystem": filesystem_of(store_dir),
    }


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


# ----------------------------------------------------------------------------- page cache


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


# ----------------------------------------------------------------------------- generation


def make_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """`length` seeded random token ids in [SPECIAL_IDS, vocab_size): no <unk>, <s> or </s>."""
    rng = random.Random(seed)
    return [rng.randrange(SPECIAL_IDS, vocab_size) for _ in range(length)]


def generate_run(llm: LLM, prompt: list[int], params: SamplingParams) -> dict:
    """One generate: wall seconds, tokens and seconds per phase, counters per phase (from the
    engine's per-phase counters, e.g. decode_stall_s)."""
    before = llm.stats()
    cpu_before = cpu_snapshot()
    out = llm.generate(prompt, params)[0]
    cpu_after = cpu_snapshot()
    after = llm.stats()
    if len(out.token_ids) != params.max_new_tokens:
        raise RuntimeError(f"generated {len(out.token_ids)} tokens, expected {params.max_new_tokens}")
    return {
        "wall_s": cpu_after[0] - cpu_before[0],
        "background_cpu": background_cpu(cpu_before, cpu_after),
        **{k: after[k] - before[k] for k in ("prefill_tokens", "prefill_s", "decode_tokens", "decode_s")},
        **{phase: {k: after[f"{phase}_{k}"] - before[f"{phase}_{k}"] for k in COUNTERS} for phase in PHASES},
        "resident_experts": after["resident_experts"],
    }


def hit_rate(c: dict) -> float | None:
    """(hits + prefetch_hits) / all expert uses; None when nothing was used."""
    used = c["hits"] + c["prefetch_hits"] + c["misses"]
    return (c["hits"] + c["prefetch_hits"]) / used if used else None


def summarise_runs(runs: list[dict]) -> dict:
    """Medians over runs of the rates, whole-run counters, and per-phase counters."""
    med = statistics.median
    total = [{k: r["prefill"][k] + r["decode"][k] for k in COUNTERS} for r in runs]
    decode_s = med(r["decode_s"] for r in runs)
    summary = {
        "prefill_tok_s": med(r["prefill_tokens"] / r["prefill_s"] for r in runs),
        "decode_tok_s": med(r["decode_tokens"] / r["decode_s"] for r in runs),
        "wall_s": med(r["wall_s"] for r in runs),
        "prefill_s": med(r["prefill_s"] for r in runs),
        "decode_s": decode_s,
        "spread": max(r["wall_s"] for r in runs) / min(r["wall_s"] for r in runs),
        "total": {k: med(t[k] for t in total) for k in COUNTERS},
        "hit_rate": med(hit_rate(t) or 0.0 for t in total),
        "prefill": {k: med(r["prefill"][k] for r in runs) for k in COUNTERS},
        "decode": {k: med(r["decode"][k] for r in runs) for k in COUNTERS},
        "decode_hit_rate": med(hit_rate(r["decode"]) or 0.0 for r in runs),
        "stall_share_of_decode": med(r["decode"]["stall_s"] / r["decode_s"] for r in runs),
        "resident_experts_end": runs[-1]["resident_experts"],
        "background_cpu_max": max((r["background_cpu"] for r in runs if r["background_cpu"] is not None), default=None),
    }
    # where decode time goes: waiting for loads, and everything else (compute, bookkeeping)
    summary["decode_other_s"] = decode_s - summary["decode"]["stall_s"]
    stall = summary["decode"]["stall_s"]
    summary["decode_load_gb_s"] = summary["decode"]["bytes_from_disk"] / stall / GB if stall > 0 else None
    return summary


def measure_generation(
    llms: dict[float, LLM], prompt: list[int], new_tokens: int, repeats: int, store_file: Path | None
) -> dict[float, list[dict]]:
    """One warm-up per budget, then `repeats` rounds of one run per budget, order flipping.

    Offloaded budgets get the store's pages dropped before each run, so loads come from disk."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for llm in llms.values():
        generate_run(llm, prompt, params)
    budgets = list(llms)
    runs: dict[float, list[dict]] = {b: [] for b in budgets}
    bar = tqdm(total=repeats * len(budgets), desc="generate runs", unit="run")
    for round_index in range(repeats):
        for budget in budgets if round_index % 2 == 0 else budgets[::-1]:
            bar.set_postfix_str(f"budget {budget:g}")
            if store_file is not None and budget < 1:
                drop_cached_pages(store_file)
            runs[budget].append(generate_run(llms[budget], prompt, params))
            bar.update()
    bar.close()
    return runs


# ----------------------------------------------------------------------------- store reads


def read_plain(path: Path, buffer: np.ndarray) -> tuple[int, float]:
    """Reads all of `path` front to back in len(buffer)-byte buffered reads: (bytes, seconds)."""
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total, time.perf_counter() - start


def read_store(store: ExpertStore, buffers: list[np.ndarray], order: list[tuple[int, int]]) -> tuple[int, float]:
    """read_into of every record in `order` from len(buffers) threads, each read into a free
    buffer of `buffers`: (bytes, seconds)."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    for buffer in buffers:
        free.put(buffer)

    def read(key: tuple[int, int]) -> None:
        buffer = free.get()
        try:
            store.read_into(key[0], key[1], buffer)
        finally:
            free.put(buffer)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(buffers)) as pool:
        for future in [pool.submit(read, key) for key in order]:
            future.result()
    return len(order) * store.layout.record_nbytes, time.perf_counter() - start


def crc32_gb_s(buffer: np.ndarray, repeats: int = 5) -> float:
    """zlib.crc32 speed over `buffer` in memory, one thread: the check read_into adds per byte."""
    start = time.perf_counter()
    for _ in range(repeats):
        zlib.crc32(buffer)
    return repeats * buffer.nbytes / (time.perf_counter() - start) / GB


def measure_reads(store: ExpertStore, repeats: int, workers: int, seed: int) -> dict:
    """`repeats` rounds of a plain read and a store read of the whole store, order flipping,
    each after dropping the file from the page cache. Medians, raw samples and cache shares."""
    path = store.path
    plain_buffer = aligned_buffer(CHUNK)
    plain_buffer.fill(0)  # touch the pages now, not inside the timed read
    buffers = [aligned_buffer(store.layout.record_nbytes) for _ in range(workers)]
    for buffer in buffers:
        buffer.fill(0)
    keys = [(layer, expert) for layer in range(store.num_layers) for expert in range(store.num_experts)]
    rng = random.Random(seed)
    samples = {m: {"gb_s": [], "seconds": [], "cached_before": [], "background_cpu": []} for m in ("plain", "store")}
    nbytes = {}
    bar = tqdm(total=2 * repeats, desc="store reads", unit="read")
    for round_index in range(repeats):
        methods = ("plain", "store") if round_index % 2 == 0 else ("store", "plain")
        for method in methods:
            bar.set_postfix_str(method)
            drop_cached_pages(path)
            samples[method]["cached_before"].append(cached_fraction(path))
            order = rng.sample(keys, len(keys))
            cpu_before = cpu_snapshot()
            if method == "plain":
                n, seconds = read_plain(path, plain_buffer)
            else:
                n, seconds = read_store(store, buffers, order)
            samples[method]["background_cpu"].append(background_cpu(cpu_before, cpu_snapshot()))
            nbytes[method] = n
            samples[method]["seconds"].append(seconds)
            samples[method]["gb_s"].append(n / seconds / GB)
            bar.update()
    bar.close()
    result = {m: {"bytes": nbytes[m], "gb_s_median": statistics.median(s["gb_s"]), **s} for m, s in samples.items()}
    ratio = result["store"]["gb_s_median"] / result["plain"]["gb_s_median"]
    cached = [c for s in samples.values() for c in s["cached_before"] if c is not None]
    return {
        **result,
        "ratio_store_over_plain": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "direct": store.direct,
        "direct_error": store.direct_error,
        "io_workers": workers,
        "records": len(keys),
        "record_nbytes": store.layout.record_nbytes,
        "file_nbytes": path.stat().st_size,
        "max_cached_before": max(cached) if cached else None,
        "crc32_gb_s_one_thread": crc32_gb_s(buffers[0]),
    }


# ----------------------------------------------------------------------------- output


def csv_text(results: dict) -> str:
    """One row per budget (kind=generate) and one per read method (kind=read), shared columns."""
    columns = [
        "kind", "budget", "slots", "prefill_tok_s", "decode_tok_s", "decode_vs_full", "hit_rate", "hits", "misses",
        "mb_from_disk", "mb_to_device", "stall_s", "decode_stall_s", "stall_share_of_decode",
        "read_method", "read_gb_s", "read_ratio_store_over_plain", "direct",
        "prompt_tokens", "new_tokens", "repeats", "policy", "torch_threads", "processor", "store_fs", "timestamp_utc",
    ]  # fmt: skip
    machine = results["machine"]
    common = {
        **{k: results["parameters"][k] for k in ("prompt_tokens", "new_tokens", "repeats", "policy")},
        "torch_threads": machine["torch_threads"],
        "processor": machine["processor"],
        "store_fs": machine["store_filesystem"]["type"],
        "timestamp_utc": machine["timestamp_utc"],
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in results["budgets"]:
        writer.writerow(
            {
                "kind": "generate",
                **{
                    k: row[k]
                    for k in ("budget", "slots", "prefill_tok_s", "decode_tok_s", "decode_vs_full", "hit_rate")
                },
                "hits": row["total"]["hits"],
                "misses": row["total"]["misses"],
                "mb_from_disk": row["total"]["bytes_from_disk"] / MB,
                "mb_to_device": row["total"]["bytes_to_device"] / MB,
                "stall_s": row["total"]["stall_s"],
                "decode_stall_s": row["decode"]["stall_s"],
                "stall_share_of_decode": row["stall_share_of_decode"],
                **common,
            }
        )
    reads = results["reads"]
    for method in ("plain", "store"):
        writer.writerow(
            {
                "kind": "read",
                "read_method": method,
                "read_gb_s": reads[method]["gb_s_median"],
                "read_ratio_store_over_plain": reads["ratio_store_over_plain"],
                "direct": reads["direct"] if method == "store" else False,
                **common,
            }
        )
    return buffer.getvalue()


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or 'n/a' for None."""
    return "n/a" if value is None else format(value, spec)


def print_table(results: dict) -> None:
    """The generation table (one row per budget), then the read table and the ratio."""
    header = (
        f"{'budget':>6}{'slots':>6}{'prefill tok/s':>14}{'decode tok/s':>13}{'vs 1.0':>8}{'hit rate':>9}"
        f"{'misses p+d':>12}{'disk MB':>9}{'to-dev MB':>10}{'stall s p+d':>14}{'stall/decode':>13}{'bg cpu':>8}"
    )
    print()
    print(header)
    for r in results["budgets"]:
        p, d = r["prefill"], r["decode"]
        print(
            f"{r['budget']:>6.2f}{r['slots']:>6}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>13.1f}"
            f"{fmt(r['decode_vs_full'], '.2f'):>8}{r['hit_rate']:>9.2f}"
            f"{p['misses']:>6.0f}+{d['misses']:<5.0f}{r['total']['bytes_from_disk'] / MB:>9.0f}"
            f"{r['total']['bytes_to_device'] / MB:>10.0f}{p['stall_s']:>7.3f}+{d['stall_s']:<6.3f}"
            f"{r['stall_share_of_decode']:>13.2f}{fmt(r['background_cpu_max'], '.0%'):>8}"
        )
    params, machine = results["parameters"], results["machine"]
    print(
        f"(P={params['prompt_tokens']}, N={params['new_tokens']}, policy {params['policy']}, host_budget 0, "
        f"median of {params['repeats']}, {machine['torch_threads']} threads, float32, CPU; "
        "p+d = prefill + decode, MB = 1e6 bytes, per run;\n bg cpu = most of the CPUs other processes "
        "kept busy during a timed run)"
    )
    reads = results["reads"]
    fs = machine["store_filesystem"]
    print()
    print(f"{'read':<8}{'GB/s':>8}{'runs GB/s':>20}{'cached before':>15}{'bg cpu':>8}")
    for method in ("plain", "store"):
        m = reads[method]
        cached = [c for c in m["cached_before"] if c is not None]
        background = [c for c in m["background_cpu"] if c is not None]
        print(
            f"{method:<8}{m['gb_s_median']:>8.2f}{' '.join(f'{x:.2f}' for x in m['gb_s']):>20}"
            f"{fmt(max(cached) if cached else None, '.1%'):>15}{fmt(max(background) if background else None, '.0%'):>8}"
        )
    verdict = "meets" if reads["meets_target"] else "BELOW"
    print(
        f"store/plain = {reads['ratio_store_over_plain']:.2f} ({verdict} the {TARGET_RATIO} target); "
        f"O_DIRECT {'on' if reads['direct'] else 'off: ' + str(reads['direct_error'])}; "
        f"{reads['io_workers']} workers; crc32 alone {reads['crc32_gb_s_one_thread']:.2f} GB/s per thread"
    )
    print(
        f"store {reads['file_nbytes'] / MB:.0f} MB on {fs['type']} ({fs['device']}, mounted at {fs['mount']}), "
        f"not tmpfs: {fs['type'] != 'tmpfs'}; page cache dropped (fadvise DONTNEED) before every read"
    )


def warn_if_noisy(results: dict, limit: float = 1.5) -> None:
    """Warns when the timed runs of a budget differ by more than `limit`x, or reads were cached."""
    for r in results["budgets"]:
        if r["spread"] > limit:
            print(
                f"WARNING: budget {r['budget']:g}: timed runs differ by {r['spread']:.1f}x (other processes kept up to "
                f"{fmt(r['background_cpu_max'], '.0%')} of the CPUs busy); rerun or raise --repeats",
                file=sys.stderr,
            )
    background = results["machine"]["background_cpu_share"]
    if background is not None and background > 0.2:
        print(
            f"WARNING: other processes kept {background:.0%} of the CPUs busy over the whole benchmark; "
            "the rates are lower than on an idle machine",
            file=sys.stderr,
        )
    cached = results["reads"]["max_cached_before"]
    if cached is not None and cached > 0.05:
        print(
            f"WARNING: up to {cached:.0%} of the store stayed in the page cache after DONTNEED; "
            "the plain read is partly served from memory",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument("--budgets", default="0.25,0.5,1.0", help="expert budgets, fractions of all expert bytes")
    parser.add_argument("--policy", default="lru", help="cache policy of the offloaded runs")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length P")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run N (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds R; medians are reported")
    parser.add_argument(
        "--offload-dir", type=Path, default=None,
        help="folder of the expert store (default: a temporary folder under the working directory, removed at the end)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt and the read order")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for offload-cpu.json/.csv")
    args = parser.parse_args(argv)
    try:
        args.budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError:
        parser.error(f"--budgets: expected comma-separated fractions, found {args.budgets!r}")
    if not args.budgets or not all(0 < b <= 1 for b in args.budgets):
        parser.error("--budgets: expected fractions in (0, 1]")
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("expected --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1")
    return args


def run_benchmark(args: argparse.Namespace, path: Path, store_dir: Path) -> dict:
    """Builds (or opens) the store, runs both parts, and returns the results object."""
    checkpoint = Checkpoint.open(path)
    spec = checkpoint.spec
    machine = machine_info(store_dir)
    cpu_start = cpu_snapshot()
    start = time.perf_counter()
    store = ExpertStore.open_or_build(checkpoint, store_dir, torch.float32, progress=True)
    store_s = time.perf_counter() - start
    total = store.num_layers * store.num_experts  # MoE layers x experts: every record of the store
    prompt = make_prompt(spec.vocab_size, args.prompt_tokens, args.seed)
    fs = machine["store_filesystem"]
    print(
        f"model {path}  budgets {args.budgets}  P={args.prompt_tokens} N={args.new_tokens} R={args.repeats} "
        f"threads={torch.get_num_threads()}\nstore {store.path} ({'built' if store.built else 'reused'} in "
        f"{store_s:.1f} s, O_DIRECT {'on' if store.direct else 'off'}) on {fs['type']} {fs['device']}"
        + (", a temporary folder removed at the end" if args.offload_dir is None else "")
    )

    llms: dict[float, LLM] = {}
    load_s = {}
    try:
        for budget in args.budgets:
            start = time.perf_counter()
            llms[budget] = LLM(
                path, device="cpu", dtype="float32", progress=False,
                expert_budget=budget, host_budget=0, offload_dir=store_dir, policy=args.policy,
            )  # fmt: skip
            load_s[budget] = time.perf_counter() - start
        offloaded = any(b < 1 for b in args.budgets)
        runs = measure_generation(llms, prompt, args.new_tokens, args.repeats, store.path if offloaded else None)
    finally:
        for llm in llms.values():
            llm.close()
    try:
        reads = measure_reads(store, args.repeats, OffloadConfig().io_threads, args.seed)
    finally:
        store.close()
    machine["load_average_end"] = load_average()
    machine["background_cpu_share"] = background_cpu(cpu_start, cpu_snapshot())

    rows = []
    for budget in args.budgets:
        slots = min(int(budget * total + 1e-9), total)
        rows.append(
            {
                "budget": budget,
                "slots": slots,
                "load_s": load_s[budget],
                **summarise_runs(runs[budget]),
                "runs": runs[budget],
            }
        )
    full = next((r["decode_tok_s"] for r in rows if r["budget"] == 1.0), None)
    for row in rows:
        row["decode_vs_full"] = row["decode_tok_s"] / full if full else None
    return {
        "benchmark": "offload-cpu",
        "method": __doc__.split("\n\n", 1)[1].split("\n\nUnits")[0],
        "machine": machine,
        "model": {"path": str(path), "num_layers": spec.num_layers, "moe_layers": store.num_layers,
                  "num_experts": spec.num_experts, "top_k": spec.top_k, "hidden_size": spec.hidden_size,
                  "expert_ffn": spec.expert_ffn, "expert_record_mb": store.layout.record_nbytes / MB},
        "parameters": {
            "budgets": args.budgets, "policy": args.policy, "host_budget": 0, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed, "dtype": "float32",
            "device": "cpu", "batch_size": 1, "offload_dir": str(store_dir),
            "offload_dir_temporary": args.offload_dir is None,
        },
        "store": {"path": str(store.path), "built": store.built, "open_or_build_s": store_s,
                  "record_nbytes": store.layout.record_nbytes, "direct": store.direct},
        "budgets": rows,
        "reads": reads,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.model if args.model is not None else ensure_default_model()
    # the store goes on the working directory's file system (real disk, not a tmpfs /tmp)
    store_dir = args.offload_dir or Path(tempfile.mkdtemp(prefix=".offload-bench-", dir="."))
    store_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_benchmark(args, path, store_dir)
    finally:
        if args.offload_dir is None:
            shutil.rmtree(store_dir, ignore_errors=True)

    print_table(results)
    warn_if_noisy(results)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = args.out / "offload-cpu.json", args.out / "offload-cpu.csv"
    write_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_atomic(csv_path, csv_text(results))
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
