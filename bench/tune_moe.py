"""Offline tuner of the fused-MoE block sizes: times candidate BlockConfigs of fused_moe on a GPU for
each model shape and token count M, keeps the fastest whose output matches the torch reference, and
writes one tuned file per (E, N, K, dtype, device) that moe_block_config reads (the format is in
moeinf/kernels/block_configs.py). With --format int8, int8g or int4 it tunes fused_quant_moe (quant_moe.py)
on weights in that format instead, into files whose names carry the format (float files stay as
they are).

Run on a CUDA machine:
  python -m bench.tune_moe [--models NAME ...] [--tokens 1 16 64 256 1024 4096] [--budget-s 150]
                           [--max-candidates 16] [--out-dir moeinf/kernels/configs] [--results-dir bench/results]
                           [--format int8|int8g|int4 [--group-size 128]]
  python -m bench.tune_moe --dry-run-list [--models ...] [--tokens ...]   the candidates in the order tried; no GPU
Smoke test anywhere (CPU, Triton interpreter, tiny shapes, perf_counter timer; files go to a new temp
directory unless --out-dir is given):
  python -m bench.tune_moe --smoke

Shapes: bench/kernels.py's GPU_MODELS, Mixtral-8x7B (D=4096 F=14336 E=8 top-2), Qwen3-30B-A3B (D=2048
F=768 E=128 top-8), DeepSeek-V2-Lite (D=2048 F=1408 E=64 top-6). E is what fused_moe looks files up
by, expert_slots.shape[0]: the runtime runs shared experts apart from fused_moe, so DeepSeek-V2-Lite's
files have E = 64, its routed experts.

Weights: float (the default) in --dtype; or w13 and w2 both quantized (kernels/quantize.py's RTN) to
--format: int8 per output channel, or int4 or int8g (grouped int8: GPTQ 8-bit, compressed-tensors
W8A16) in groups of --group-size (default 128; smoke 32) inputs, symmetric, float16 scales (the
common GPTQ / compressed-tensors layouts); x in
--dtype. The file is keyed by x's dtype and the format, not the group size: the int4 kernel cuts
block_k to the group (quant_moe.int4_block_k), so a file tuned at G = 128 serves every G, its
block_k cut for smaller ones (candidates that the cut would change are pruned).

Method, for each (model, M):
  candidates  the grid block_m 16/32/64/128 x block_n 32/64/128 x block_k 32/64/128 x group_m 1/8 x
              num_warps 4/8 x num_stages 2/3/4, pruned (prune_reason: padding, shared memory,
              registers), searched in two rounds of at most --max-candidates together. Round 1 (60%):
              the heuristic, a few priors, then one launch (warps, stages nearest 4, 3) per tile
              (block sizes, group_m), the tiles nearest the heuristic's first. Round 2: the other
              launches of round 1's two fastest tiles
  compile     on a GPU, --compile-workers processes first compile every (M, candidate) into Triton's
              on-disk cache, so that the timing loop loads kernels instead of compiling them one by one
  check       each candidate's output against moe_experts_reference in float32 (float64 for float32
              runs) on the same inputs (quantized weights: the routed experts dequantized): a relative
              RMS error above --tolerance, a NaN, or a failed compile or launch rejects it
  time        triton.testing.do_bench's median (L2 flushed between runs) of the whole fused_moe call,
              alignment, both GEMMs and the combine: what the runtime pays
  select      the fastest accepted candidate (select_best). The heuristic is always measured, so an
              entry is never slower than the fallback as far as the timings tell
  budget      --budget-s is shared out over the models, then the rounds, then the M, unspent time
              rolling over; a case stops trying candidates when its share is spent
Writes one config file per model into --out-dir (atomically; it replaces an older file of the same
name) and every trial to <results-dir>/tune_moe-<device>.csv (tune_moe-<device>-<format>.csv for
quantized weights); prints a progress bar and a summary.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    # before triton is imported: the kernels then run in Triton's CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import concurrent.futures
import functools
import itertools
import math
import multiprocessing
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton
import triton.testing
from tqdm import tqdm

from bench.common import csv_text
from bench.kernels import GPU_MODELS, make_experts, make_quant_experts, make_tokens
from moeinf.atomic_write import write_text_atomic
from moeinf.kernels.block_configs import (
    CONFIG_DIR,
    INTERPRETER_DEVICE,
    BlockConfig,
    device_name,
    heuristic_config,
    interpreting,
    write_config_file,
)
from moeinf.kernels.moe import fused_moe
from moeinf.kernels.quant_moe import fused_quant_moe, int4_block_k
from moeinf.kernels.quantize import QuantizedMatrix, dequantize
from moeinf.kernels.reference import moe_experts_reference
from moeinf.kernels.tolerance import MODEL_SHAPE_TOLERANCE, rel_rms

BENCH = Path(__file__).resolve().parent

# name: (hidden D, expert ffn F, experts E, top-k K); tiny shapes for the interpreter
SMOKE_MODELS = {"tiny": (64, 32, 4, 2), "tiny-odd": (48, 40, 6, 3)}
GPU_TOKENS = (1, 16, 64, 256, 1024, 4096)
SMOKE_TOKENS = (1, 8)
QUANT_FORMATS = ("int8", "int8g", "int4")  # int8g: grouped int8 (GPTQ 8-bit), quant_moe's key
GROUPED = ("int8g", "int4")  # the formats with a group size
GROUP_SIZE, SMOKE_GROUP_SIZE = 128, 32  # int4 inputs per group: every GPU model's D and F are multiples of 128

GRID = {
    "block_m": (16, 32, 64, 128),
    "block_n": (32, 64, 128),
    "block_k": (32, 64, 128),
    "group_m": (1, 8),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}
assert tuple(GRID) == tuple(f.name for f in fields(BlockConfig))  # BlockConfig(*values) below

# guesses in the style of published fused-MoE tuning tables (vLLM's): for decode a thin block_m and a
# deep block_k, for prefill 64-128 tiles grouped for L2; tried right after the heuristic where the
# pruning keeps them. Unmeasured here: the timings decide.
PRIORS_DECODE = (  # M <= E: about one token per expert
    BlockConfig(16, 64, 128, 1, 4, 4),
    BlockConfig(16, 128, 128, 1, 4, 3),
    BlockConfig(16, 64, 64, 1, 4, 4),
    BlockConfig(32, 64, 128, 1, 4, 3),
)
PRIORS_PREFILL = (
    BlockConfig(64, 128, 64, 8, 4, 3),
    BlockConfig(128, 128, 64, 8, 8, 3),
    BlockConfig(128, 64, 64, 8, 4, 4),
    BlockConfig(64, 64, 64, 8, 4, 4),
)

SMEM_BYTES = 227 * 1024  # shared memory a Hopper block may opt into
ACC_REGS_PER_THREAD = 128  # fp32 accumulator registers per thread past which spills are likely
FIRST_ROUND = 0.6  # of the candidates and of the time: tiles; the rest: launch variants of the best tiles
CSV_COLUMNS = (
    "device", "model", "D", "F", "E", "K", "M", "dtype", "format", *GRID, "heuristic", "status", "ms", "rel_rms",
    "chosen", "note", "timestamp_utc",
)  # fmt: skip


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    """The expert weights a run tunes for: float (format None: fused_moe) or quantized, both w13 and
    w2 in `format` (fused_quant_moe); int4 in groups of group_size, symmetric, float16 scales."""

    format: str | None = None
    group_size: int | None = None

    def __post_init__(self):
        if self.format not in (None, *QUANT_FORMATS):
            raise ValueError(f"weights format: expected None or one of {QUANT_FORMATS}, found {self.format!r}")
        if (self.format in GROUPED) != (self.group_size is not None):
            raise ValueError(
                f"weights: expected a group size with {' and '.join(GROUPED)} only, found {self.format} {self.group_size}"
            )

    @property
    def label(self) -> str:
        """The CSV's format column, and the summary's."""
        if self.format is None:
            return "float"
        return self.format if self.group_size is None else f"{self.format}-g{self.group_size}"

    @property
    def runner(self) -> Callable:
        return fused_moe if self.format is None else fused_quant_moe

    def unfit(self, shape: tuple[int, int, int, int]) -> str | None:
        """Why these weights cannot hold a model of shape (D, F, E, K), or None."""
        D, F, _, _ = shape
        if self.group_size is not None and (D % self.group_size or F % self.group_size):
            return f"{self.format} groups of {self.group_size} need D = {D} and F = {F} multiples of it"
        return None

    def experts(self, shape, dtype: torch.dtype, device: torch.device, zeros: bool = False):
        """(w13, w2, slots) of every expert of the shape, slot = expert id; zeros: placeholder weights
        of the same layout (all codes 0, scales 1) for compiling."""
        D, F, E, _ = shape
        if self.format is None:
            if zeros:
                w13 = torch.zeros(E, 2 * F, D, dtype=dtype, device=device)
                return w13, torch.zeros(E, D, F, dtype=dtype, device=device), torch.arange(E, device=device)
            return make_experts(D, F, E, dtype, device)
        if not zeros:
            return make_quant_experts(D, F, E, dtype, device, self.format, self.group_size)
        return self._zeros(2 * F, D, E, device), self._zeros(D, F, E, device), torch.arange(E, device=device)

    def _zeros(self, N: int, K: int, E: int, device: torch.device) -> QuantizedMatrix:
        if self.format == "int8":
            q = torch.zeros(E, N, K, dtype=torch.int8, device=device)
            return QuantizedMatrix("int8", q, torch.ones(E, N, device=device))
        if self.format == "int8g":
            q = torch.zeros(E, N, K, dtype=torch.int8, device=device)
            scale = torch.ones(E, N, K // self.group_size, dtype=torch.float16, device=device)
            return QuantizedMatrix("int8", q, scale, None, self.group_size)
        q = torch.zeros(E, N, K // 2, dtype=torch.uint8, device=device)
        scale = torch.ones(E, N, K // self.group_size, dtype=torch.float16, device=device)
        return QuantizedMatrix("int4", q, scale, None, self.group_size)


# ----------------------------------------------------------------------------- candidates


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def prune_reason(
    config: BlockConfig, M: int, shape: tuple[int, int, int, int], itemsize: int, group_size: int | None = None
) -> str | None:
    """Why `config` is not worth timing for M tokens of shape (D, F, E, K), or None. group_size: int4
    weights' G (their kernel cuts block_k to int4_block_k), None for float and int8 weights."""
    D, F, E, K = shape
    pairs = M * K
    per_expert = math.ceil(pairs / min(E, pairs))  # (token, expert) pairs of a routed expert, on average
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if bm > max(32, next_pow2(per_expert)):
        return "block_m: a row block holds one expert's pairs; taller is padding"
    if bn > max(32, next_pow2(min(D, F))) or bk > max(32, next_pow2(min(D, F))):
        return "block_n/block_k: wider than the matrices"
    if config.group_m > 1 and per_expert < 2 * bm:
        return "group_m: one row block per expert, nothing to share in L2"
    if group_size is not None and int4_block_k(bk, group_size) != bk:
        return "block_k: int4 runs it as another block_k (cut to the group)"
    if config.num_stages * (bm * bk + 2 * bk * bn) * itemsize > SMEM_BYTES:
        return "shared memory: x, gate and up tiles of every stage"
    if 2 * bm * bn > ACC_REGS_PER_THREAD * 32 * config.num_warps:
        return "registers: the gate and up accumulators"
    if config.num_warps == 8 and bm * bn < 64 * 64:
        return "num_warps: 8 warps on a small tile"
    return None


def tile(config: BlockConfig) -> tuple[int, int, int, int]:
    return config.block_m, config.block_n, config.block_k, config.group_m


def distance(a: BlockConfig, b: BlockConfig, launch: bool = True) -> float:
    """How far two configs are: powers of two of the block sizes, a different group_m, and (launch)
    powers of two of num_warps and half a step per pipeline stage."""
    steps = sum(abs(math.log2(x) - math.log2(y)) for x, y in zip(tile(a)[:3], tile(b)[:3])) + (a.group_m != b.group_m)
    if launch:
        steps += abs(math.log2(a.num_warps) - math.log2(b.num_warps)) + 0.5 * abs(a.num_stages - b.num_stages)
    return steps


@dataclass
class Plan:
    """The candidates of one (model, M): the first round, and every config the pruning kept (the
    second round picks launch variants of the fastest tiles among them)."""

    first: list[BlockConfig]
    kept: list[BlockConfig]
    grid: int


def plan_candidates(
    M: int,
    shape: tuple[int, int, int, int],
    itemsize: int,
    heuristic: BlockConfig,
    limit: int,
    group_size: int | None = None,
) -> Plan:
    """First round, in the order tried: the heuristic (whether or not the pruning keeps it: it is the
    baseline), the priors the pruning keeps, then one config per tile (block sizes and group_m) with
    the launch nearest 4 warps and 3 stages, tiles nearest the heuristic's first; cut to `limit`.
    group_size: int4 weights' G (see prune_reason)."""
    grid = [BlockConfig(*values) for values in itertools.product(*GRID.values())]
    kept = [c for c in grid if prune_reason(c, M, shape, itemsize, group_size) is None]
    kept_set = set(kept)
    priors = [c for c in (PRIORS_DECODE if M <= shape[2] else PRIORS_PREFILL) if c in kept_set and c != heuristic]
    chosen = [heuristic, *priors]
    by_tile: dict[tuple, BlockConfig] = {}
    for c in sorted(kept, key=lambda c: (abs(math.log2(c.num_warps / 4)) + 0.5 * abs(c.num_stages - 3), astuple(c))):
        by_tile.setdefault(tile(c), c)  # the kept launch nearest 4 warps, 3 stages
    seen = {tile(c) for c in chosen}
    rest = sorted(
        (c for t, c in by_tile.items() if t not in seen), key=lambda c: (distance(c, heuristic, False), astuple(c))
    )
    return Plan(first=(chosen + rest)[: max(1, limit)], kept=kept, grid=len(grid))


def second_round(
    trials: Sequence[Trial], kept: Sequence[BlockConfig], tolerance: float, limit: int
) -> list[BlockConfig]:
    """Launch variants (num_warps, num_stages) of the two fastest tiles of the first round that the
    pruning kept and nobody tried yet, nearest the tried config first; at most `limit`."""
    tried = {t.config for t in trials}
    ranked = sorted((t for t in trials if accepted(t, tolerance)), key=lambda t: t.ms)
    out: list[BlockConfig] = []
    for trial in ranked[:2]:
        variants = [c for c in kept if tile(c) == tile(trial.config) and c not in tried and c not in out]
        out += sorted(variants, key=lambda c: (distance(c, trial.config), astuple(c)))
    return out[: max(0, limit)]


def describe(config: BlockConfig) -> str:
    c = config
    return f"m{c.block_m} n{c.block_n} k{c.block_k} g{c.group_m} w{c.num_warps} s{c.num_stages}"


# ----------------------------------------------------------------------------- trials


@dataclass
class Trial:
    config: BlockConfig
    heuristic: bool = False
    status: str = "untried"  # ok | rejected (wrong output) | failed (compile or launch error)
    ms: float | None = None
    error: float | None = None  # relative RMS error against the reference
    note: str = ""


def accepted(trial: Trial, tolerance: float) -> bool:
    return (
        trial.error is not None
        and math.isfinite(trial.error)
        and trial.error <= tolerance
        and trial.ms is not None
        and math.isfinite(trial.ms)
    )


def select_best(trials: Sequence[Trial], tolerance: float) -> Trial | None:
    """The fastest trial whose output was within tolerance (the earlier on a tie), or None."""
    ok = [(t.ms, i, t) for i, t in enumerate(trials) if accepted(t, tolerance)]
    return min(ok)[2] if ok else None


def reference_output(x, ids, weights, w13, w2, slots) -> torch.Tensor:
    """moe_experts_reference on the same inputs, in float32 (float64 for float32 runs), reading only
    the routed experts' weights (a wide copy of every expert of Mixtral would be GBs); quantized
    weights (QuantizedMatrix) are dequantized, those experts only."""
    wide = torch.float64 if x.dtype == torch.float32 else torch.float32
    used = ids.unique()  # [U] routed experts
    compact = torch.full_like(slots, -1)
    compact[used] = torch.arange(used.numel(), device=slots.device, dtype=slots.dtype)
    rows = slots[used]

    def routed(w) -> torch.Tensor:  # [U, N, K] in the wide dtype
        return (dequantize(w[rows]) if isinstance(w, QuantizedMatrix) else w[rows]).to(wide)

    return moe_experts_reference(x.to(wide), ids, weights.to(wide), routed(w13), routed(w2), compact)


def run_trial(trial: Trial, call: Callable[[], torch.Tensor], reference: torch.Tensor, timer, tolerance: float):
    """Runs one candidate: checks its output, then (only if right) times it."""
    try:
        out = call()
        trial.error = rel_rms(out, reference)
    except Exception as error:  # out of shared memory or registers, a compile or launch error
        trial.status, trial.note = "failed", f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
        return
    if not (math.isfinite(trial.error) and trial.error <= tolerance):
        trial.status, trial.note = "rejected", f"rel_rms {trial.error:.2e} above {tolerance:.1e}"
        return
    trial.ms = float(timer(call))
    trial.status = "ok"


def tune_case(
    inputs: tuple,
    candidates: Sequence[BlockConfig],
    *,
    timer: Callable[[Callable], float],
    tolerance: float,
    deadline: float,
    heuristic: BlockConfig | None = None,
    runner: Callable = fused_moe,
    on_trial: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """Trials of the candidates in order until `deadline` (time.perf_counter()); the first candidate
    runs whatever the time when it is the heuristic, the baseline. inputs: (x, ids, weights, w13, w2,
    slots); runner: fused_moe's signature, or fused_quant_moe's for QuantizedMatrix weights (injectable
    for tests)."""
    x, ids, weights, w13, w2, slots = inputs
    reference = reference_output(x, ids, weights, w13, w2, slots)
    trials = []
    for i, config in enumerate(candidates):
        if time.perf_counter() >= deadline and not (i == 0 and config == heuristic):
            break
        trial = Trial(config, heuristic=config == heuristic)
        call = functools.partial(runner, x, ids, weights, w13, w2, slots, config=config)
        run_trial(trial, call, reference, timer, tolerance)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
    return trials


def cuda_timer(warmup_ms: float, rep_ms: float) -> Callable[[Callable], float]:
    def timer(call: Callable) -> float:
        return triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    return timer


def cpu_timer(repeats: int) -> Callable[[Callable], float]:
    """Median ms of `repeats` calls after a warm one: for --smoke, where the figures mean nothing."""

    def timer(call: Callable) -> float:
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return timer


# ----------------------------------------------------------------------------- parallel compile

_WORKER_WEIGHTS: dict = {}


def _compile_one(
    shape: tuple[int, int, int, int], dtype_name: str, device: str, M: int, config: BlockConfig, kind: Weights
) -> str:
    """In a worker process: one fused_moe (fused_quant_moe) call of the real shapes and layouts (zero
    weights), which compiles its kernels into Triton's on-disk cache. Returns '' or the error."""
    D, F, E, K = shape
    dtype = getattr(torch, dtype_name)
    if _WORKER_WEIGHTS.get("key") != (shape, dtype_name, device, kind):
        _WORKER_WEIGHTS.clear()
        w13, w2, slots = kind.experts(shape, dtype, torch.device(device), zeros=True)
        _WORKER_WEIGHTS.update(key=(shape, dtype_name, device, kind), w13=w13, w2=w2, slots=slots)
    w = _WORKER_WEIGHTS
    x, ids, weights = make_tokens(M, D, E, K, dtype, torch.device(device), seed=M)
    try:
        kind.runner(x, ids, weights, w["w13"], w["w2"], w["slots"], config=config)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:
        return f"{type(error).__name__}: {str(error).strip()[:160]}"
    return ""


class CompilePool:
    """Worker processes (spawned: CUDA cannot run in a forked child) that compile kernels into Triton's
    on-disk cache ahead of the timing loop. One pool serves the whole run: a worker starts in seconds
    (torch, triton), a compile takes about as long."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.broken = False

    def compile(
        self, shape, dtype: torch.dtype, device: torch.device, jobs: list, deadline: float, kind: Weights = Weights()
    ) -> tuple[int, int]:
        """Compiles the (M, config) jobs until `deadline`; returns (compiled, failed). Jobs left over
        compile in the timing loop. Returns only when no worker is busy, so that no compile or worker
        launch overlaps a timing."""
        if self.broken or not jobs:
            return 0, 0
        dtype_name = str(dtype).removeprefix("torch.")
        futures = [self.pool.submit(_compile_one, shape, dtype_name, device.type, M, c, kind) for M, c in jobs]
        compiled = failed = 0
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(0.0, deadline - time.perf_counter())):
                if future.result():
                    failed += 1
                else:
                    compiled += 1
        except concurrent.futures.TimeoutError:
            pass
        except Exception as error:  # a worker died: the timing loop compiles what is left
            self.broken = True
            print(f"compile workers stopped: {type(error).__name__}: {error}", file=sys.stderr)
        finally:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
        return compiled, failed

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- the run


@dataclass
class CaseResult:
    model: str
    shape: tuple[int, int, int, int]
    M: int
    trials: list[Trial]
    best: Trial | None = None

    @property
    def heuristic(self) -> Trial:
        return next(t for t in self.trials if t.heuristic)


def speedup(result: CaseResult) -> float | None:
    if result.best is None or result.heuristic.ms is None:
        return None
    return result.heuristic.ms / result.best.ms


def source_text(
    model: str, results: list[CaseResult], label: str, command: str, timing: str, kind: Weights = Weights()
) -> str:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = []
    for r in results:
        if r.best is None:
            continue
        heur = f"{r.heuristic.ms:.4f}" if r.heuristic.ms is not None else "n/a (rejected)"
        gain = speedup(r)
        parts.append(
            f"M={r.M}: best {r.best.ms:.4f} ms vs heuristic {heur} ms"
            + (f" ({gain:.2f}x" if gain is not None else " (")
            + f", {len(r.trials)} tried)"
        )
    return (
        f"bench/tune_moe.py, {model}, {kind.label} weights, on {label} (torch {torch.__version__}, "
        f"triton {triton.__version__}), {stamp}; command: {command}; {timing}; " + "; ".join(parts)
    )


def trials_csv(results: list[CaseResult], device: str, dtype: torch.dtype, kind: Weights = Weights()) -> str:
    """Every trial of every case, one row each, the chosen one marked."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for r in results:
        D, F, E, K = r.shape
        for t in r.trials:
            row = dict(device=device, model=r.model, D=D, F=F, E=E, K=K, M=r.M,
                       dtype=str(dtype).removeprefix("torch."), format=kind.label, heuristic=int(t.heuristic),
                       status=t.status,
                       ms="" if t.ms is None else f"{t.ms:.5f}", rel_rms="" if t.error is None else f"{t.error:.2e}",
                       chosen=int(t is r.best), note=t.note, timestamp_utc=stamp)  # fmt: skip
            row.update({name: getattr(t.config, name) for name in GRID})
            rows.append(row)
    return csv_text(CSV_COLUMNS, rows)


def print_summary(results: list[CaseResult]) -> None:
    print(f"\n{'model':<18} {'M':>5} {'tried':>5} {'ok':>3} {'rej':>3} {'fail':>4} {'heur ms':>10} {'best ms':>10} "
          f"{'speedup':>8}  best config")  # fmt: skip
    for r in results:
        count = {s: sum(t.status == s for t in r.trials) for s in ("ok", "rejected", "failed")}
        heur = f"{r.heuristic.ms:.4f}" if r.heuristic.ms is not None else r.heuristic.status
        best = f"{r.best.ms:.4f}" if r.best is not None else "none"
        gain = speedup(r)
        print(
            f"{r.model:<18} {r.M:>5} {len(r.trials):>5} {count['ok']:>3} {count['rejected']:>3} {count['failed']:>4} "
            f"{heur:>10} {best:>10} {(f'{gain:.2f}x' if gain else '-'):>8}  "
            + (describe(r.best.config) if r.best is not None else "")
        )


def dry_run_list(models: dict, tokens, itemsize: int, device: str, limit: int, group_size: int | None = None) -> None:
    first = math.ceil(FIRST_ROUND * limit)
    for name, shape in models.items():
        for M in tokens:
            heuristic = heuristic_config(M, shape[2], device)
            plan = plan_candidates(M, shape, itemsize, heuristic, first, group_size)
            print(
                f"{name} (D, F, E, K) = {shape}, M={M}: grid {plan.grid}, kept {len(plan.kept)}; first round "
                f"{len(plan.first)}, then up to {limit - len(plan.first)} launch variants of the 2 fastest tiles"
            )
            for i, c in enumerate(plan.first):
                mark = "heuristic" if i == 0 else f"tile distance {distance(c, heuristic, launch=False):.1f}"
                print(f"  {i:>3}  {describe(c):<28} {mark}")


def tune_model(
    name: str,
    shape: tuple[int, int, int, int],
    tokens: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    config_device: str,
    args: argparse.Namespace,
    timer: Callable[[Callable], float],
    tolerance: float,
    model_deadline: float,
    pool: CompilePool | None,
    bar: tqdm,
    kind: Weights = Weights(),
) -> list[CaseResult]:
    """Both rounds of every M of one model: round 1 (tiles) gets FIRST_ROUND of the time and of the
    candidates, round 2 (launch variants of the fastest tiles) the rest. In each round the compile
    pool, if any, gets up to half the round's time before the timings start."""
    D, F, E, K = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    first_limit = math.ceil(FIRST_ROUND * args.max_candidates)
    heuristics = {M: heuristic_config(M, E, config_device) for M in tokens}
    plans = {M: plan_candidates(M, shape, itemsize, heuristics[M], first_limit, kind.group_size) for M in tokens}
    results = {M: CaseResult(name, shape, M, []) for M in tokens}
    w13, w2, slots = kind.experts(shape, dtype, device)
    for round_index in (0, 1):
        now = time.perf_counter()
        round_deadline = now + (FIRST_ROUND if round_index == 0 else 1.0) * (model_deadline - now)
        candidates = {
            M: plans[M].first
            if round_index == 0
            else second_round(results[M].trials, plans[M].kept, tolerance, args.max_candidates - len(results[M].trials))
            for M in tokens
        }
        if pool is not None:
            jobs = [(M, c) for M in tokens for c in candidates[M]]
            bar.set_postfix_str(f"{name} round {round_index + 1}: compiling {len(jobs)} (M, config) pairs ahead")
            compiled, failed = pool.compile(shape, dtype, device, jobs, now + 0.5 * (round_deadline - now), kind)
            bar.write(
                f"{name} round {round_index + 1}: compiled {compiled} and failed {failed} of {len(jobs)} "
                f"(M, config) pairs ahead in {pool.workers} processes, {time.perf_counter() - now:.1f} s"
            )
        for case_index, M in enumerate(tokens):
            now = time.perf_counter()
            case_deadline = now + (round_deadline - now) / (len(tokens) - case_index)
            x, ids, weights = make_tokens(M, D, E, K, dtype, device, seed=M)

            def progress(trial: Trial, M=M, round_index=round_index) -> None:
                text = f"{name} M={M} round {round_index + 1}: {describe(trial.config)} {trial.status}"
                bar.set_postfix_str(text, refresh=False)

            results[M].trials += tune_case(
                (x, ids, weights, w13, w2, slots), candidates[M], timer=timer, tolerance=tolerance,
                deadline=case_deadline, heuristic=heuristics[M], runner=kind.runner, on_trial=progress,
            )  # fmt: skip
            bar.update(1)
    for M, result in results.items():
        result.best = select_best(result.trials, tolerance)
        if result.heuristic.status != "ok":
            h = result.heuristic
            bar.write(f"warning: {name} M={M}: the heuristic {describe(h.config)} {h.status}: {h.note}")
    return list(results.values())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: tests the script")
    parser.add_argument("--dry-run-list", action="store_true", help="print the candidates in order and exit")
    parser.add_argument("--models", nargs="+", help="model names (default: every model of the mode's table)")
    parser.add_argument("--tokens", nargs="+", type=int, help="token counts M (default: 1 16 64 256 1024 4096)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default bf16 (smoke: fp32)")
    parser.add_argument(
        "--format", choices=QUANT_FORMATS, help="quantized weights: tune fused_quant_moe (default: float)"
    )
    parser.add_argument(
        "--group-size", type=int, help=f"int4 inputs per group (default {GROUP_SIZE}; smoke {SMOKE_GROUP_SIZE})"
    )
    parser.add_argument("--budget-s", type=float, default=150.0, help="seconds for the whole run, compiles included")
    parser.add_argument("--max-candidates", type=int, default=16, help="candidates per (model, M), heuristic included")
    parser.add_argument(
        "--tolerance",
        type=float,
        help="relative RMS error allowed (default: moeinf.kernels.tolerance.MODEL_SHAPE_TOLERANCE of the dtype)",
    )
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warmup per candidate")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench timed repetitions per candidate")
    parser.add_argument("--compile-workers", type=int, help="processes compiling ahead (default min(8, CPUs); smoke 0)")
    parser.add_argument("--smoke-repeats", type=int, default=3, help="smoke: timed calls per candidate")
    parser.add_argument("--out-dir", type=Path, help=f"where config files go (default {CONFIG_DIR}; smoke: a temp dir)")
    parser.add_argument("--results-dir", type=Path, help="where the trials CSV goes (default bench/results)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.tune_moe", *(sys.argv[1:] if argv is None else argv)])
    table = SMOKE_MODELS if args.smoke else GPU_MODELS
    unknown = set(args.models or ()) - set(table)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; expected some of {sorted(table)}")
    models = {name: table[name] for name in (args.models or table)}
    tokens = sorted(set(args.tokens or (SMOKE_TOKENS if args.smoke else GPU_TOKENS)))
    dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if args.group_size is not None and args.format not in GROUPED:
        raise SystemExit(f"--group-size is for --format {' or '.join(GROUPED)}, found --format {args.format}")
    group_size = None
    if args.format in GROUPED:
        group_size = args.group_size or (SMOKE_GROUP_SIZE if args.smoke else GROUP_SIZE)
    kind = Weights(args.format, group_size)
    unfit = {name: kind.unfit(shape) for name, shape in models.items() if kind.unfit(shape)}
    if unfit:
        raise SystemExit(f"models that {kind.label} weights cannot hold: {unfit}; choose others with --models")

    if args.smoke:
        if not interpreting():
            raise SystemExit(
                "--smoke needs TRITON_INTERPRET=1 before triton is imported (run python -m bench.tune_moe --smoke)"
            )
        device, device_label = torch.device("cpu"), "Triton interpreter (CPU)"
    elif torch.cuda.is_available() and not interpreting():
        device, device_label = torch.device("cuda"), torch.cuda.get_device_name()
    elif not args.dry_run_list:
        raise SystemExit("no CUDA device (or TRITON_INTERPRET=1): tune on a GPU, or pass --smoke or --dry-run-list")
    else:
        device, device_label = None, "a GPU"
    config_device = INTERPRETER_DEVICE if args.smoke else (device_name(device) if device is not None else "GPU")
    if args.dry_run_list:
        dry_run_list(models, tokens, itemsize, config_device, args.max_candidates, kind.group_size)
        return 0

    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="tune_moe-")) if args.smoke else CONFIG_DIR)
    results_dir = args.results_dir or (out_dir if args.smoke else BENCH / "results")
    tolerance = args.tolerance if args.tolerance is not None else MODEL_SHAPE_TOLERANCE[dtype]
    workers = args.compile_workers
    if workers is None:
        workers = 0 if args.smoke else min(8, os.cpu_count() or 1)
    if args.smoke:
        timer, timing = cpu_timer(args.smoke_repeats), f"perf_counter median of {args.smoke_repeats} calls"
    else:
        timer = cuda_timer(args.warmup_ms, args.rep_ms)
        timing = f"do_bench median, warmup {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms, L2 flushed"
    print(
        f"tuning {list(models)} at M={tokens} in {str(dtype).removeprefix('torch.')}, {kind.label} weights, on "
        f"{device_label}, budget "
        f"{args.budget_s:g} s, up to {args.max_candidates} candidates per case, {workers} compile workers"
    )

    start = time.perf_counter()
    deadline = start + args.budget_s
    results: list[CaseResult] = []
    pool = CompilePool(workers) if workers > 0 else None  # on the CPU (smoke) only to test the pool
    bar = tqdm(total=2 * len(models) * len(tokens), desc="tuning", unit="case-round", mininterval=1.0)
    try:
        for model_index, (name, shape) in enumerate(models.items()):
            model_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(models) - model_index)
            results += tune_model(
                name, shape, tokens, dtype, device, config_device, args, timer, tolerance, model_deadline, pool, bar,
                kind,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if pool is not None:
            pool.close()
    bar.close()
    print(f"tuned in {time.perf_counter() - start:.1f} s (budget {args.budget_s:g} s)")
    print_summary(results)

    written = []
    for name, shape in models.items():
        D, F, E, K = shape
        model_results = [r for r in results if r.model == name and r.best is not None]
        if not model_results:
            print(f"warning: {name}: no candidate passed, no file written", file=sys.stderr)
            continue
        source = source_text(name, model_results, device_label, command, timing, kind)
        configs = {r.M: r.best.config for r in model_results}
        written.append(write_config_file(out_dir, E, F, D, dtype, config_device, configs, source, format=kind.format))
    suffix = "" if kind.format is None else f"-{kind.format}"
    csv_path = results_dir / f"tune_moe-{config_device}{suffix}.csv"
    write_text_atomic(csv_path, trials_csv(results, config_device, dtype, kind))
    for path in written:
        print(f"wrote {path}")
    print(f"wrote {csv_path}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
