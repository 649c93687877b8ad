"""Expert store read benchmark on the CPU: the default model's packed expert store on disk, read
record by record as the runtime reads it, against a plain read of the same file.

Run:  python -m bench.store_reads [--model DIR] [--repeats 3] [--offload-dir DIR] [--seed 0]
                                  [--out bench/results]

Results go to <out>/store-reads-cpu.json and <out>/store-reads-cpu.csv, with the machine's
description. bench/offload_decode.py measures decoding with the same store.

R rounds of two reads of the whole store file (float32), the order of the two flipping every round:
  plain: the whole file read front to back with buffered 8 MiB reads into one preallocated buffer
  store: ExpertStore.read_into of every record (layer, expert), shuffled, from a pool of
    io_threads (the runtime's default) workers, each into its own ALIGN-aligned buffer (O_DIRECT
    when store.direct); read_into includes its crc32 check, as the runtime pays it
  Before every measurement the file's pages are dropped from the page cache
  (posix_fadvise DONTNEED) and the share still cached is measured with mincore(2).
  ratio = store GB/s / plain GB/s, target >= 0.8.

Units: seconds (s), MB = 1e6 bytes, GB/s = 1e9 bytes per second; R = --repeats.
  bg cpu: share of the machine's CPUs that other processes used during a measurement (/proc/stat
  busy time minus this process's CPU time); other work on the machine skews every figure here.
"""

from __future__ import annotations

import argparse
import queue
import random
import statistics
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.common import GB, MB, background_cpu, cpu_snapshot, csv_text, fmt, warn_if_busy, write_results
from bench.offload_store import StoreSession, add_store_arguments, cached_fraction, drop_cached_pages, store_session
from moeinf.loaders.expert_store import ExpertStore, aligned_buffer
from moeinf.runtime.setup import OffloadConfig

CHUNK = 8 * 2**20  # bytes per plain read
TARGET_RATIO = 0.8  # store GB/s / plain GB/s


# ----------------------------------------------------------------------------- reads


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

CSV_COLUMNS = (
    "read_method", "read_gb_s", "read_ratio_store_over_plain", "direct", "repeats", "torch_threads", "processor",
    "store_fs", "timestamp_utc",
)  # fmt: skip


def csv_rows(results: dict) -> list[dict]:
    """One row per read method, with the run's settings, for spreadsheets."""
    reads, machine = results["reads"], results["machine"]
    return [
        {
            "read_method": method,
            "read_gb_s": reads[method]["gb_s_median"],
            "read_ratio_store_over_plain": reads["ratio_store_over_plain"],
            "direct": reads["direct"] if method == "store" else False,
            "repeats": results["parameters"]["repeats"],
            "torch_threads": machine["torch_threads"],
            "processor": machine["processor"],
            "store_fs": machine["store_filesystem"]["type"],
            "timestamp_utc": machine["timestamp_utc"],
        }
        for method in ("plain", "store")
    ]


def print_table(results: dict) -> None:
    """One row per read method, then the ratio and where the store lives."""
    reads = results["reads"]
    fs = results["machine"]["store_filesystem"]
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


def warn_if_noisy(results: dict) -> None:
    """Warns when the machine was busy, or the reads were partly served from the page cache."""
    warn_if_busy(results["machine"])
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
    add_store_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds R; medians are reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the read order")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for store-reads-cpu.json/.csv")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("expected --repeats >= 1")
    return args


def results_object(args: argparse.Namespace, session: StoreSession, reads: dict) -> dict:
    """What store-reads-cpu.json holds: the settings, the machine, and the reads."""
    return {
        "benchmark": "store-reads-cpu",
        "method": __doc__.split("\n\n", 1)[1].split("\n\nUnits")[0],
        "machine": session.machine,
        "model": session.model_summary(),
        "parameters": {
            "repeats": args.repeats, "seed": args.seed, "dtype": "float32", "device": "cpu",
            "offload_dir": str(session.folder), "offload_dir_temporary": session.temporary,
        },
        "store": session.store_summary(),
        "reads": reads,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with store_session(args.model, args.offload_dir) as session:
        print(f"model {session.path}  R={args.repeats}\n{session.describe()}")
        reads = measure_reads(session.store, args.repeats, OffloadConfig().io_threads, args.seed)
    results = results_object(args, session, reads)
    print_table(results)
    warn_if_noisy(results)
    write_results(args.out, "store-reads-cpu", results, csv_text(CSV_COLUMNS, csv_rows(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
