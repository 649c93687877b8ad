"""GPU offloading figures: host-to-device bandwidth on CuPy streams against torch's copy of the
same pinned buffer, and decode speed of a synthetic Mixtral-shaped model at 25/50/100% expert
budget (and resident again with the torch references in place of the Triton kernels: the kernels'
end-to-end effect), and transformers with Accelerate's offloading at the same budget (25% by
default; bench/accelerate_baseline.py, where accelerate is installed: the baseline MoE-Infinity's
paper reports 4-20x against), all in one run on one machine.

Run on a CUDA machine:  python -m bench.gpu_offload [--layers 4] [--new-tokens 32] [--out bench/results]
Smoke test anywhere:    python -m bench.gpu_offload --smoke   (tiny model, CPU, no bandwidth part)

The synthetic model has Mixtral-8x7B's expert shape (hidden 4096, expert ffn 14336, 8 experts,
top-2, bf16: 352 MB an expert) but only --layers layers, so its experts (layers x 2.8 GB) and its
store fit the machine's disk while a 25% budget still forces real traffic. Its weights are random:
the figures are about bytes and time, not text.
Hybrid placement (the host computes misses from the pinned host tier while the GPU computes the
slots' experts): a second synthetic model of Qwen3-30B-A3B's expert shape (hidden 2048, expert
ffn 768, 128 experts, top-8, bf16: 9.4 MB an expert; --hybrid-layers layers, so model and store
fit the disk and the host tier the host memory), decoded at 25 / 50% budget with host_compute
never / always / auto against fully resident ("hybrid" in the results; --hybrid-layers 0 skips).
Units: GB/s = 1e9 bytes per second; decode tok/s = generated tokens after the first / seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from bench import accelerate_baseline
from moeinf import LLM, SamplingParams
from moeinf.atomic_write import write_text_atomic
from moeinf.loaders.default_model import DEFAULT_CONFIG, write_checkpoint

FULL_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128
)
SMOKE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
QWEN3_SHAPE = dict(
    hidden_size=2048, intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_local_experts=128, num_experts_per_tok=8,
)  # fmt: skip
SMOKE_QWEN3_SHAPE = dict(SMOKE_SHAPE, num_local_experts=16, num_experts_per_tok=4)


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def time_cuda(fn, repeats: int) -> float:
    """Median seconds of fn() measured with CUDA events on the current stream."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def h2d_bandwidth(nbytes: int, repeats: int) -> dict:
    """GB/s of one pinned host buffer copied to the device: CuPy memcpyAsync on its own stream
    against torch's non_blocking copy_, same buffers, interleaved."""
    import cupy

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = cupy.cuda.Stream(non_blocking=True)

    def cupy_copy() -> float:
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        cupy.cuda.runtime.memcpyAsync(
            dst.data_ptr(), src.data_ptr(), nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr
        )
        end.record(stream)
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3

    def torch_copy() -> float:
        return time_cuda(lambda: dst.copy_(src, non_blocking=True), 1)

    cupy_times, torch_times = [], []
    for _ in range(repeats):
        cupy_times.append(cupy_copy())
        torch_times.append(torch_copy())
    cupy_s, torch_s = sorted(cupy_times)[repeats // 2], sorted(torch_times)[repeats // 2]
    return {
        "bytes": nbytes,
        "cupy_gbps": nbytes / cupy_s / 1e9,
        "torch_gbps": nbytes / torch_s / 1e9,
        "cupy_over_torch": torch_s / cupy_s,
    }


def build_model(folder: Path, layers: int, smoke: bool, shape: dict | None = None) -> Path:
    shape = shape or (SMOKE_SHAPE if smoke else FULL_SHAPE)
    config = dict(DEFAULT_CONFIG, num_hidden_layers=layers, **shape)
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, config, seed=0, progress=True)
    return folder


def decode_run(
    model: Path, budget: float, device: str, store: Path, new_tokens: int, kernels: str = "auto", **hybrid
) -> dict:
    """One budget: load, warm up, then a timed greedy generation of new_tokens. kernels: 'auto'
    (Triton on CUDA) or 'torch' (the references: the end-to-end baseline of the kernels); hybrid:
    host_budget and host_compute, when given."""
    load_start = time.perf_counter()
    llm = LLM(
        model, device=device, dtype="bfloat16", expert_budget=budget, offload_dir=store, progress=False, kernels=kernels,
        **hybrid,
    )  # fmt: skip
    load_s = time.perf_counter() - load_start
    prompt = list(range(3, 35))
    llm.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))
    before = llm.stats()
    llm.generate([prompt], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    after = llm.stats()
    llm.close()
    delta = {k: after[k] - before[k] for k in after if k != "resident_experts"}
    total = delta["hits"] + delta["prefetch_hits"] + delta["misses"]
    return {
        "budget": budget,
        "kernels": kernels,
        "load_s": load_s,
        "decode_tok_s": delta["decode_tokens"] / delta["decode_s"],
        "prefill_s": delta["prefill_s"],
        "hit_rate": (delta["hits"] + delta["prefetch_hits"]) / total if total else 1.0,
        "bytes_to_device": delta["bytes_to_device"],
        "bytes_from_disk": delta["bytes_from_disk"],
        "stall_s": delta["stall_s"],
        "host_computed": delta["host_computed"],
        "promotions": delta["promotions"],
        "promotion_hits": delta["promotion_hits"],
        "resident_experts": after["resident_experts"],
        **hybrid,
    }


def hybrid_runs(work: Path, layers: int, device: str, new_tokens: int, smoke: bool) -> list[dict]:
    """The Qwen3-30B-A3B-shaped model at 25 / 50% budget with host_compute never / always / auto
    (every expert in the pinned host tier), and fully resident: decode speed against resident."""
    model = build_model(work / "qwen3-model", layers, smoke, SMOKE_QWEN3_SHAPE if smoke else QWEN3_SHAPE)
    store = work / "qwen3-store"
    resident = decode_run(model, 1.0, device, store, new_tokens)
    runs = [resident]
    for budget in (0.25, 0.5):
        for mode in ("never", "always", "auto"):
            runs.append(decode_run(model, budget, device, store, new_tokens, host_budget=1.0, host_compute=mode))
    for r in runs:
        r["decode_vs_resident"] = r["decode_tok_s"] / resident["decode_tok_s"]
        print(
            f"qwen3-shaped, budget {r['budget']:.2f}, host_compute {r.get('host_compute', '-')}: decode "
            f"{r['decode_tok_s']:.2f} tok/s ({r['decode_vs_resident']:.2f}x resident), hit rate {r['hit_rate']:.2f}, "
            f"{r['host_computed']} host-computed, {r['promotions']} promotions, {r['bytes_to_device'] / 1e9:.2f} GB "
            "to device"
        )
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return runs


def accelerate_runs(model: Path, runs: list[dict], device: str, work: Path, new_tokens: int) -> list[dict]:
    """The transformers + Accelerate baseline at the budgets of `runs` (moeinf's, Triton kernels),
    with moeinf's decode speed over it."""
    baseline = []
    for r in runs:
        if device == "cuda":
            torch.cuda.empty_cache()
        b = accelerate_baseline.decode_run(model, r["budget"], device, work / "accelerate-offload", new_tokens)
        b["moeinf_over_accelerate"] = r["decode_tok_s"] / b["decode_tok_s"]
        print(
            f"budget {r['budget']:.2f}: moeinf {r['decode_tok_s']:.2f} decode tok/s, transformers + Accelerate "
            f"{b['decode_tok_s']:.2f} ({b['layers_on_device']} of {b['num_layers']} layers kept on the device): "
            f"{b['moeinf_over_accelerate']:.1f}x"
        )
        baseline.append(b)
    return baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budgets", default="0.25,0.5,1.0")
    parser.add_argument("--copy-mib", type=int, default=352, help="size of the bandwidth test buffer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where the model and store are written (default: ./.gpu-bench)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to test this script")
    parser.add_argument(
        "--hybrid-layers", type=int, default=4, help="layers of the Qwen3-30B-A3B-shaped hybrid model (0: skip it)"
    )
    parser.add_argument("--hybrid-only", action="store_true", help="only the hybrid part (gpu-hybrid-*.json)")
    parser.add_argument(
        "--accelerate-budgets",
        default="0.25",
        help="budgets (of --budgets, < 1) to also run transformers + Accelerate at; '' skips the baseline",
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    info = machine()
    results = {"machine": info, "parameters": vars(args), "device": device}
    work = Path(args.workdir or ".gpu-bench")
    name = info.get("gpu", "cpu-smoke").lower().replace(" ", "-")
    if args.hybrid_only:
        try:
            results["hybrid"] = hybrid_runs(work, max(args.hybrid_layers, 1), device, args.new_tokens, args.smoke)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        out = Path(args.out) / f"gpu-hybrid-{name}.json"
        write_text_atomic(out, json.dumps(results, indent=2))
        print(f"wrote {out}")
        return
    if cuda:
        results["h2d"] = h2d_bandwidth(args.copy_mib * 2**20, args.repeats)
        h = results["h2d"]
        print(
            f"H2D {args.copy_mib} MiB pinned: CuPy {h['cupy_gbps']:.1f} GB/s, torch {h['torch_gbps']:.1f} GB/s "
            f"(CuPy/torch {h['cupy_over_torch']:.2f}x)"
        )
    try:
        model = build_model(work / "model", args.layers, args.smoke)
        runs = []
        for budget in tqdm([float(b) for b in args.budgets.split(",")], desc="budgets"):
            runs.append(decode_run(model, budget, device, work / "store", args.new_tokens))
        base = next((r for r in runs if r["budget"] == 1.0), runs[-1])
        # the same resident run with the torch references in place of the Triton kernels
        runs.append(decode_run(model, base["budget"], device, work / "store", args.new_tokens, kernels="torch"))
        for r in runs:
            r["decode_vs_resident"] = r["decode_tok_s"] / base["decode_tok_s"]
            print(
                f"budget {r['budget']:.2f}, kernels {r['kernels']}: decode {r['decode_tok_s']:.2f} tok/s "
                f"({r['decode_vs_resident']:.2f}x resident), hit rate {r['hit_rate']:.2f}, "
                f"{r['bytes_to_device'] / 1e9:.2f} GB to device, stall {r['stall_s']:.2f} s"
            )
        results["decode"] = runs
        if args.hybrid_layers > 0:
            results["hybrid"] = hybrid_runs(work, args.hybrid_layers, device, args.new_tokens, args.smoke)
        wanted = {float(b) for b in args.accelerate_budgets.split(",") if b.strip()}
        if wanted and importlib.util.find_spec("accelerate") is not None:
            chosen = [r for r in runs if r["budget"] in wanted and r["budget"] < 1.0 and r["kernels"] == "auto"]
            results["accelerate"] = accelerate_runs(model, chosen, device, work, args.new_tokens)
        else:
            print("transformers + Accelerate baseline skipped (no --accelerate-budgets, or accelerate missing)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out) / f"gpu-offload-{name}.json"
    write_text_atomic(out, json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
