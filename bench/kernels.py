"""Kernel microbenchmark: the fused MoE Triton kernel against torch baselines, same inputs, same run.

Run:  python -m bench.kernels [--cpu] [--models NAME ...] [--tokens 1 16 256 4096] [--out bench/results]
                              [--formats float int8 int8g int4]

GPU (the default where CUDA is available): bfloat16, the real expert shapes of
  Mixtral-8x7B      D=4096 F=14336 E=8   top-2
  Qwen3-30B-A3B     D=2048 F=768   E=128 top-8
  DeepSeek-V2-Lite  D=2048 F=1408  E=64  top-6   (routed experts only; its 2 shared experts are
                                                  2 more always-routed columns, see moe.py)
at M = 1, 16, 256, 4096 tokens. Every implementation is timed with triton.testing.do_bench
(warmup 25 ms, rep 100 ms, L2 flushed between runs; median and min of the runs) and written to
<out>/kernels-<gpu>.csv.

CPU (--cpu, or no CUDA): the torch paths only (the Triton interpreter measures numpy, not the
kernel), float32, on scaled-down shapes, timed pytest-benchmark style: a warm-up call, rounds
calibrated to --min-time seconds, min / median / mean / stddev of the rounds; written to
<out>/kernels-cpu.csv.
The same CPU cases also run under pytest-benchmark, each output checked against the reference:
  python -m pytest bench/kernels.py --benchmark-only -q   (the default test run never collects it)

Implementations (all: x [M, D] -> out [M, D], the contract of moe_experts_reference):
  triton      moeinf.kernels.moe.fused_moe (GPU only)
  reference   moe_experts_reference: one loop over experts through the slot table (the CPU path)
  loop        transformers' eager loop: torch.where(topk_ids == e) for every expert, one host sync each
  grouped_mm  torch._grouped_mm over the tokens sorted by expert (where torch has it); it needs the
              experts stacked in id order, so it runs on the identity slot table the bench uses

Quantized weights (GPU only; --formats int8 / int8g / int4, all by default): the same experts quantized
with kernels/quantize.py's RTN, int8 per output channel, or int8g (grouped int8, GPTQ 8-bit's layout)
or int4 in groups of 128 inputs (symmetric, float16 scales), x in bfloat16:
  triton-int8 / triton-int8g / triton-int4  moeinf.kernels.quant_moe.fused_quant_moe on the packed weights
  triton-int8-dequant / triton-int4-dequant  fused_moe on the same weights dequantized to bfloat16
                                             (what the quantized kernel saves against)
Their rel_rms is against quantized_moe_experts_reference (the float32 reference on the dequantized
experts), their speedup the -dequant row's median over this one's, and their bytes count the
quantized arrays (q, scale, zero) of the routed experts for the triton-int* rows.

Units and model:
  flops   = 6 * M * K * D * F  (gate, up and down GEMMs of the M*K routed pairs)
  bytes   = (distinct routed experts) * 3 * D * F * itemsize + 2 * M * D * itemsize
            (each routed expert's weights read once, x read and out written once: the compulsory
             traffic; intermediates are not counted)
  TFLOP/s = flops / median time; GB/s = bytes / median time
  roofline_ms = max(flops / peak FLOP/s, bytes / peak bandwidth), from the spec-sheet peaks in
            GPU_PEAKS (dense bf16, HBM); roofline_frac = roofline_ms / median_ms (1 = at the roof).
  speedup = reference median / this median; rel_rms = relative RMS error of this output against
            the reference's on the same inputs.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton.testing

from bench.common import csv_text
from moeinf.atomic_write import write_text_atomic
from moeinf.kernels.block_configs import device_name
from moeinf.kernels.moe import fused_moe
from moeinf.kernels.quant_moe import fused_quant_moe
from moeinf.kernels.quantize import dequantize, quantize, quantized_moe_experts_reference
from moeinf.kernels.reference import moe_experts_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms

# name: (hidden D, expert ffn F, experts E, top-k K)
GPU_MODELS = {
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
    "DeepSeek-V2-Lite": (2048, 1408, 64, 6),
}
# the same expert counts and top-k, shapes shrunk so the CPU loops finish in seconds
CPU_MODELS = {
    "Mixtral-8x7B/16": (256, 896, 8, 2),
    "Qwen3-30B-A3B/8": (256, 96, 128, 8),
    "DeepSeek-V2-Lite/8": (256, 176, 64, 6),
}
GPU_TOKENS = (1, 16, 256, 4096)
CPU_TOKENS = (1, 16, 64)
FORMATS = ("float", "int8", "int8g", "int4")  # --formats: the float implementations, and each quantized format's rows
INT4_GROUP_SIZE = 128  # every GPU model's D and F are multiples of it

# device-name substring -> (dense bf16 TFLOP/s, HBM TB/s), spec sheets; the first match wins
GPU_PEAKS = {
    "H200": (989.0, 4.8),
    "H100 PCIe": (756.0, 2.0),
    "H100": (989.0, 3.35),
    "A100": (312.0, 2.0),
    "L40S": (362.0, 0.864),
    "RTX 4090": (165.0, 1.008),
}

COLUMNS = (
    "device", "model", "M", "D", "F", "E", "K", "dtype", "impl", "median_ms", "min_ms", "rounds",
    "tflops", "gbs", "roofline_ms", "roofline_frac", "speedup", "rel_rms", "note", "timestamp_utc",
)  # fmt: skip


# ----------------------------------------------------------------------------- baselines


def per_expert_loop(x, topk_ids, topk_weights, w13, w2, expert_slots):
    """transformers' eager MoE loop: find each expert's tokens with torch.where."""
    out = torch.zeros_like(x)
    ffn = w2.shape[-1]
    for expert, slot in enumerate(expert_slots.tolist()):
        token, k = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], w13[slot]).split(ffn, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[slot]) * topk_weights[token, k, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def grouped_mm_moe(x, topk_ids, topk_weights, w13, w2, expert_slots):
    """Two torch._grouped_mm calls over the pairs sorted by expert; experts stacked in id order."""
    K = topk_ids.shape[1]
    ffn = w2.shape[-1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [T*K] pairs grouped by expert
    counts = torch.zeros(expert_slots.shape[0], dtype=torch.int64, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end of each expert's rows
    tokens = order // K
    gate_up = torch._grouped_mm(x[tokens], w13.transpose(1, 2), offs=offs)  # [T*K, 2F]
    act = F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)  # [T*K, D]
    y = y.to(torch.float32) * topk_weights.reshape(-1)[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y).to(x.dtype)


def implementations(on_gpu: bool) -> dict[str, Callable]:
    impls = {"reference": moe_experts_reference, "loop": per_expert_loop}
    if hasattr(torch, "_grouped_mm"):
        impls["grouped_mm"] = grouped_mm_moe
    if on_gpu:
        impls = {"triton": fused_moe} | impls
    return impls


# ----------------------------------------------------------------------------- inputs and models


def make_experts(D, FF, E, dtype, device, seed=0):
    """w13 [E, 2F, D] and w2 [E, D, F], scaled for O(1) activations; every expert resident in
    slot = expert id (slots [E])."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = (torch.randn(E, 2 * FF, D, generator=g, device=device, dtype=dtype) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(E, D, FF, generator=g, device=device, dtype=dtype) / math.sqrt(FF)).to(dtype)
    return w13, w2, torch.arange(E, device=device)


def make_quant_experts(D, FF, E, dtype, device, format, group_size=INT4_GROUP_SIZE, seed=0):
    """make_experts' weights quantized with quantize.py's RTN: int8 per output channel, or int4 or
    grouped int8 ("int8g", the GPTQ 8-bit layout) in groups of group_size inputs, symmetric, float16
    scales. Returns (w13, w2, slots), w13 and w2 QuantizedMatrix stacks [E, 2F, D] and [E, D, F]."""
    w13, w2, slots = make_experts(D, FF, E, dtype, device, seed)
    options = {} if format == "int8" else dict(group_size=group_size)
    format = "int8" if format == "int8g" else format  # grouped int8 is int8 with a group size
    return quantize(w13, format, **options), quantize(w2, format, **options), slots


def make_tokens(M, D, E, K, dtype, device, seed):
    """x [M, D] and a random routing: distinct experts per token, softmax weights renormalised
    over the top k (Mixtral's rule)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, D, generator=g, device=device, dtype=dtype)
    probs = torch.softmax(torch.randn(M, E, generator=g, device=device), dim=-1)
    weights, ids = torch.topk(probs, K, dim=-1)
    return x, ids, weights / weights.sum(-1, keepdim=True)


def work(M, D, FF, K, ids, itemsize) -> tuple[float, float]:
    flops = 6.0 * M * K * D * FF
    active = torch.unique(ids).numel()
    return flops, active * 3.0 * D * FF * itemsize + 2.0 * M * D * itemsize


# ----------------------------------------------------------------------------- timing


def time_gpu(fn: Callable[[], object]) -> dict:
    fn()  # compile and warm outside the timed runs
    times = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
    return {"median_ms": statistics.median(times), "min_ms": min(times), "rounds": len(times)}


def time_cpu(fn: Callable[[], object], min_time: float) -> dict:
    """pytest-benchmark's scheme: warm up, calibrate the number of rounds to min_time, time each."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    rounds = min(max(int(min_time / once), 5), 1000)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "stddev_ms": statistics.pstdev(times) * 1e3,
        "rounds": rounds,
    }


def gpu_peaks(name: str) -> tuple[float, float] | None:
    return next((peaks for key, peaks in GPU_PEAKS.items() if key in name), None)


# ----------------------------------------------------------------------------- the run


def measure(row: dict, call: Callable, expected: torch.Tensor, flops: float, nbytes: float, on_gpu: bool,
            min_time: float, peaks) -> float | None:  # fmt: skip
    """Checks `call`'s output against `expected` and times it into `row` (printed); returns the
    median ms, or None (with a note) where it failed."""
    try:
        row["rel_rms"] = f"{rel_rms(call(), expected):.2e}"
        timing = time_gpu(call) if on_gpu else time_cpu(call, min_time)
    except (RuntimeError, NotImplementedError) as error:  # e.g. grouped_mm on an older GPU
        row["note"] = f"failed: {str(error).splitlines()[0][:120]}"
        return None
    seconds = timing["median_ms"] / 1e3
    row.update(
        median_ms=f"{timing['median_ms']:.4f}",
        min_ms=f"{timing['min_ms']:.4f}",
        rounds=timing.get("rounds", ""),
        tflops=f"{flops / seconds / 1e12:.3f}",
        gbs=f"{nbytes / seconds / 1e9:.1f}",
    )
    if peaks is not None:
        roof_ms = max(flops / (peaks[0] * 1e12), nbytes / (peaks[1] * 1e12)) * 1e3
        row.update(roofline_ms=f"{roof_ms:.4f}", roofline_frac=f"{roof_ms / timing['median_ms']:.3f}")
    if not on_gpu:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        row["note"] = f"mean {timing['mean_ms']:.4f} ms, stddev {timing['stddev_ms']:.4f} ms, load average {load:.2f}"
    print_row(row)
    return timing["median_ms"]


def run_quantized(
    model: str, shape: tuple, tokens: tuple, format: str, device_label: str, peaks, stamp: str, on_gpu: bool = True
) -> list[dict]:
    """The GPU rows of one quantized format: fused_quant_moe on the packed experts, and fused_moe on
    the same experts dequantized to bfloat16 (see the module docstring). on_gpu False: the same on
    the CPU, in the Triton interpreter (TRITON_INTERPRET=1), timed by time_cpu: to test this code."""
    D, FF, E, K = shape
    device, dtype = torch.device("cuda" if on_gpu else "cpu"), torch.bfloat16
    w13, w2, slots = make_quant_experts(D, FF, E, dtype, device, format)
    dense13, dense2 = dequantize(w13).to(dtype), dequantize(w2).to(dtype)  # [E, 2F, D], [E, D, F]
    expert_bytes = (w13.nbytes + w2.nbytes) / E  # the quantized arrays of one expert
    rows = []
    for M in tokens:
        x, ids, weights = make_tokens(M, D, E, K, dtype, device, seed=M)
        flops, dense_bytes = work(M, D, FF, K, ids, x.element_size())
        quant_bytes = torch.unique(ids).numel() * expert_bytes + 2.0 * M * D * x.element_size()
        expected = quantized_moe_experts_reference(x, ids, weights, w13, w2, slots)
        quant_call = functools.partial(fused_quant_moe, x, ids, weights, w13, w2, slots)
        dense_call = functools.partial(fused_moe, x, ids, weights, dense13, dense2, slots)
        impls = {f"triton-{format}": (quant_call, quant_bytes), f"triton-{format}-dequant": (dense_call, dense_bytes)}
        timings = {}
        for name, (call, nbytes) in impls.items():
            row = {"device": device_label, "model": model, "M": M, "D": D, "F": FF, "E": E, "K": K,
                   "dtype": f"bfloat16 ({format} weights)", "impl": name, "timestamp_utc": stamp,
                   "note": ""}  # fmt: skip
            timings[name] = measure(row, call, expected, flops, nbytes, on_gpu, 0.0, peaks)
            rows.append(row)
        baseline = timings[f"triton-{format}-dequant"]
        for row in rows[-len(impls) :]:
            if baseline is not None and timings[row["impl"]] is not None:
                row["speedup"] = f"{baseline / timings[row['impl']]:.2f}"
        del x, ids, weights, expected
    del w13, w2, dense13, dense2
    if on_gpu:
        torch.cuda.empty_cache()
    return rows


def run(models: dict, tokens: tuple, on_gpu: bool, min_time: float, formats: tuple = ("float",)) -> list[dict]:
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    device_label = (
        torch.cuda.get_device_name()
        if on_gpu
        else f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    )
    peaks = gpu_peaks(device_label) if on_gpu else None
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    impls = implementations(on_gpu)
    rows = []
    for model, (D, FF, E, K) in models.items():
        if on_gpu:
            for format in (f for f in formats if f != "float"):
                rows += run_quantized(model, (D, FF, E, K), tokens, format, device_label, peaks, stamp)
        if "float" not in formats:
            continue
        w13, w2, slots = make_experts(D, FF, E, dtype, device)
        for M in tokens:
            x, ids, weights = make_tokens(M, D, E, K, dtype, device, seed=M)
            args = (x, ids, weights, w13, w2, slots)
            flops, nbytes = work(M, D, FF, K, ids, x.element_size())
            expected = moe_experts_reference(*args)
            timings = {}
            for name, fn in impls.items():
                row = {"device": device_label, "model": model, "M": M, "D": D, "F": FF, "E": E, "K": K,
                       "dtype": str(dtype).removeprefix("torch."), "impl": name, "timestamp_utc": stamp,
                       "note": ""}  # fmt: skip
                median = measure(row, functools.partial(fn, *args), expected, flops, nbytes, on_gpu, min_time, peaks)
                rows.append(row)
                if median is not None:
                    timings[name] = median
            for row in rows:
                if row["model"] == model and row["M"] == M and row["impl"] in timings and "reference" in timings:
                    row["speedup"] = f"{timings['reference'] / timings[row['impl']]:.2f}"
            del x, ids, weights, expected
        del w13, w2, slots
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


def print_row(row: dict) -> None:
    roof = f"  roof {row['roofline_frac']}" if row.get("roofline_frac") else ""
    print(
        f"{row['model']:>20} M={row['M']:<5} {row['impl']:>10}  {row['median_ms']:>10} ms  "
        f"{row['tflops']:>8} TFLOP/s  {row['gbs']:>8} GB/s{roof}  rel_rms {row['rel_rms']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="time the torch paths on the CPU (default without CUDA)")
    parser.add_argument("--models", nargs="+", help="model names to run (default: all of the mode's table)")
    parser.add_argument("--tokens", nargs="+", type=int, help="token counts M (default: the mode's list)")
    parser.add_argument("--min-time", type=float, default=0.2, help="CPU: seconds of timed rounds per case")
    parser.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's own choice)")
    parser.add_argument(
        "--formats", nargs="*", choices=FORMATS, default=list(FORMATS),
        help="float: the float implementations; int8, int8g, int4: the quantized rows (GPU only). Default: all",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.cpu
    if args.threads:
        torch.set_num_threads(args.threads)
    table = GPU_MODELS if on_gpu else CPU_MODELS
    unknown = set(args.models or ()) - set(table)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; expected some of {sorted(table)}")
    models = {name: table[name] for name in (args.models or table)}
    tokens = tuple(args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS))
    if not on_gpu and set(args.formats) - {"float"}:
        print(f"quantized rows ({', '.join(f for f in args.formats if f != 'float')}) run on a GPU only: skipped")
    rows = run(models, tokens, on_gpu, args.min_time, tuple(args.formats))
    label = device_name(torch.device("cuda")) if on_gpu else "cpu"
    path = args.out / f"kernels-{label}.csv"
    write_text_atomic(path, csv_text(COLUMNS, rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("M", CPU_TOKENS)
@pytest.mark.parametrize("impl", ["reference", "loop", "grouped_mm"])
@pytest.mark.parametrize("model", CPU_MODELS)
def test_cpu_torch_path(benchmark, model, impl, M):
    """One CPU case of the table above: a torch implementation, float32, output checked."""
    impls = implementations(on_gpu=False)
    if impl not in impls:
        pytest.skip(f"this torch has no {impl}")
    D, FF, E, K = CPU_MODELS[model]
    w13, w2, slots = make_experts(D, FF, E, torch.float32, torch.device("cpu"))
    x, ids, weights = make_tokens(M, D, E, K, torch.float32, torch.device("cpu"), seed=M)
    expected = moe_experts_reference(x, ids, weights, w13, w2, slots)
    benchmark.group = f"{model} M={M}"
    out = benchmark(impls[impl], x, ids, weights, w13, w2, slots)
    assert rel_rms(out, expected) < TOLERANCE[torch.float32]
