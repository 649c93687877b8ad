"""Quantized experts on the CPU: speed and round-to-nearest error of int8 / int4 experts against the
float runs of the same checkpoint, in one run.

Run:  python -m bench.quantized [--model DIR] [--prompt-tokens 128] [--new-tokens 64] [--repeats 3]
                                [--threads N] [--budget 0.25] [--out bench/results]

Configurations (dense layers in `dtype`, routed experts in `expert_dtype`):
  float32          dtype float32, experts float32 (the reference every error is measured against)
  bfloat16         dtype bfloat16, experts bfloat16 (the issue's baseline: int4 decode against it)
  int8, int4       dtype float32, experts int8 per channel / int4 in groups of 32, round to nearest
  int4-bf16        dtype bfloat16, experts int4 (the quantized experts computed in float32 and
                   rounded to bfloat16 once)
Speed: the timing method of bench/e2e.py (wall clock around generate: prefill = P / median(t of 1
token), decode = (N - 1) / (median(t of N tokens) - median(t of 1 token)), one warm-up each, the
configurations interleaved in alternating order every round); ratios against bfloat16 and float32.
Error, against float32: the relative error ||l - l_f32|| / ||l_f32|| of the prompt's logits [P, V],
and greedy agreement over N tokens (the positions that agree before the first divergence, and in
all). Store traffic: at --budget (a fraction of the experts in device slots, none in a host tier,
every miss fetched), the store bytes read per decode token of each format, and its ratio to the
float32 one (the format's bytes ratio is what it should be cut by).
Results: <out>/quantized-cpu.json and .csv, with the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import csv_text, fmt, machine_info, make_prompt, write_results
from bench.e2e import measure, model_summary, summarise
from bench.machine import load_average
from moeinf import LLM, SamplingParams, ensure_default_model

CONFIGS = {  # name: (dtype, expert_dtype)
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
    "int4-bf16": ("bfloat16", "int4"),
}


class QuantRunner:
    """One configuration's LLM, generating greedily (bench.e2e.measure's runner interface)."""

    def __init__(self, path: Path, name: str, **settings):
        self.name = name
        start = time.perf_counter()
        dtype, expert_dtype = CONFIGS[name]
        self.llm = LLM(path, device="cpu", dtype=dtype, expert_dtype=expert_dtype, progress=False, **settings)
        self.load_s = time.perf_counter() - start

    def generate(self, prompt: list[int], new_tokens: int, exact: bool) -> list[int]:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=exact)
        return self.llm.generate(prompt, params)[0].token_ids


def agreement(tokens: list[int], reference: list[int]) -> dict:
    """Greedy agreement: positions equal before the first divergence, and in all."""
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return {"agree_prefix": prefix, "agree_total": sum(a == b for a, b in zip(tokens, reference))}


def accuracy(runners: list[QuantRunner], prompt: list[int], new_tokens: int) -> dict[str, dict]:
    """Each configuration's error against float32 (see the module docstring)."""
    reference = next(r for r in runners if r.name == "float32")
    logits_f32 = reference.llm.logits(prompt).float()  # [P, V]
    tokens_f32 = reference.generate(prompt, new_tokens, exact=True)
    out = {}
    for runner in runners:
        logits = runner.llm.logits(prompt).float()
        tokens = runner.generate(prompt, new_tokens, exact=True)
        error = float((logits - logits_f32).norm() / logits_f32.norm())
        out[runner.name] = {"logits_rel_err": error, **agreement(tokens, tokens_f32)}
    return out


def store_traffic(path: Path, names: list[str], budget: float, prompt: list[int], new_tokens: int) -> dict:
    """Store bytes read per decode token at `budget`, each format in a fresh LLM over its own store."""
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in tqdm(names, desc="store traffic", unit="format"):
            settings = dict(expert_budget=budget, host_compute="never", offload_dir=folder)
            with QuantRunner(path, name, **settings).llm as llm:
                llm.generate(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
                before = llm.stats()
                llm.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                after = llm.stats()
                payload = llm.experts.layout.payload_nbytes
            decode_tokens = after["decode_tokens"] - before["decode_tokens"]
            disk = after["bytes_from_disk"] - before["bytes_from_disk"]
            out[name] = {"record_payload_bytes": payload, "disk_bytes_per_decode_token": disk / max(decode_tokens, 1)}
    base = out.get("float32")
    for row in out.values():
        if base:
            row["bytes_ratio"] = row["record_payload_bytes"] / base["record_payload_bytes"]
            row["disk_ratio"] = row["disk_bytes_per_decode_token"] / base["disk_bytes_per_decode_token"]
    return out


CSV_COLUMNS = (
    "config", "dtype", "expert_dtype", "prefill_tok_s", "decode_tok_s", "decode_vs_bf16", "decode_vs_f32",
    "logits_rel_err", "agree_prefix", "agree_total", "disk_bytes_per_decode_token", "disk_ratio", "bytes_ratio",
    "processor", "timestamp_utc",
)  # fmt: skip


def rows(results: dict) -> list[dict]:
    out = []
    for name, row in results["configs"].items():
        traffic = results["store_traffic"].get(name, {})
        out.append(
            {
                "config": name,
                **{k: row[k] for k in ("dtype", "expert_dtype", "prefill_tok_s", "decode_tok_s", "decode_vs_bf16")},
                "decode_vs_f32": row["decode_vs_f32"],
                **{k: row[k] for k in ("logits_rel_err", "agree_prefix", "agree_total")},
                **{k: traffic.get(k) for k in ("disk_bytes_per_decode_token", "disk_ratio", "bytes_ratio")},
                **{k: results["machine"][k] for k in ("processor", "timestamp_utc")},
            }
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget", type=float, default=0.25, help="expert budget of the store-traffic runs")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or "float32" not in args.configs:
        parser.error(
            f"expected --configs among {', '.join(CONFIGS)} including float32, found {unknown or args.configs}"
        )
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("expected --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = args.model if args.model is not None else ensure_default_model()
    model = model_summary(path)
    prompt = make_prompt(model["vocab_size"], args.prompt_tokens, args.seed)
    machine = machine_info()
    print(
        f"model {path}  P={args.prompt_tokens} N={args.new_tokens} R={args.repeats} threads={torch.get_num_threads()}"
    )
    runners = [QuantRunner(path, name) for name in tqdm(args.configs, desc="loading", unit="config")]
    errors = accuracy(runners, prompt, args.new_tokens)
    times = measure(runners, prompt, args.new_tokens, args.repeats)
    machine["load_average_end"] = load_average()
    configs = {}
    for runner in runners:
        summary = summarise(times[runner.name], args.prompt_tokens, args.new_tokens)
        dtype, expert_dtype = CONFIGS[runner.name]
        configs[runner.name] = {"dtype": dtype, "expert_dtype": expert_dtype, "load_s": runner.load_s, **summary}
        configs[runner.name] |= errors[runner.name]
    for row in configs.values():
        for base, key in (("bfloat16", "decode_vs_bf16"), ("float32", "decode_vs_f32")):
            other = configs.get(base, {}).get("decode_tok_s")
            row[key] = row["decode_tok_s"] / other if other and row["decode_tok_s"] else None
    for runner in runners:
        runner.llm.close()
    traffic = store_traffic(path, args.configs, args.budget, prompt, min(args.new_tokens, 16))
    results = {
        "benchmark": "quantized-cpu",
        "method": "bench/e2e.py's timing (medians of alternating rounds); errors against float32 on the same prompt",
        "machine": machine,
        "model": model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "budget": args.budget,
        "configs": configs,
        "store_traffic": traffic,
    }
    table = rows(results)
    print(
        f"\n{'config':<11}{'decode tok/s':>13}{'vs bf16':>9}{'vs f32':>8}{'logit err':>11}{'agree':>7}{'disk/token':>12}"
    )
    for row in table:
        disk = row["disk_bytes_per_decode_token"]
        print(
            f"{row['config']:<11}{fmt(row['decode_tok_s'], '.1f'):>13}{fmt(row['decode_vs_bf16'], '.2f'):>9}"
            f"{fmt(row['decode_vs_f32'], '.2f'):>8}{row['logits_rel_err']:>11.2e}{row['agree_prefix']:>7}"
            f"{fmt(None if disk is None else disk / 2**20, '.2f') + ' MiB':>12}"
        )
    write_results(args.out, "quantized-cpu", results, csv_text(CSV_COLUMNS, table))
    if any(c["spread"] > 1.5 for c in configs.values()):
        print("WARNING: timed runs differ by more than 1.5x: the machine was busy; rerun", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
