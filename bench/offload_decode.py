"""Expert offloading benchmark on the CPU: the default model decoding at several expert budgets, with
the packed expert store on disk.

Run:  python -m bench.offload_decode [--model DIR] [--budgets 0.25,0.5,1.0] [--policy lru]
                                     [--prompt-tokens 64] [--new-tokens 32] [--repeats 3]
                                     [--offload-dir DIR] [--seed 0] [--out bench/results]
                                     [--host-budget 1.0 --host-compute never|auto|always] [--name N]

Results go to <out>/offload-cpu.json and <out>/offload-cpu.csv (<out>/<name>.* with --name),
with the machine's description.
bench/store_reads.py measures the same store's reads against plain reads of its file.

One LLM per budget (float32, CPU, expert_budget=budget, host_budget=--host-budget (default 0),
host_compute=--host-compute (default never: every miss fetched; auto / always compute misses on
the host from the host tier, which needs a host budget of a layer's experts), the store in --offload-dir;
budget 1.0 keeps every expert resident and is the baseline). Each LLM gets one warm-up generate,
then R timed rounds; a round runs one generate per budget, and the budget order flips every round
so drift in machine load hits every budget alike. A generate is one prompt of P seeded random token
ids and exactly N new tokens (ignore_eos=True). Offloaded budgets get the store's pages dropped from
the page cache (posix_fadvise DONTNEED) before each timed run, so their loads come from the disk.
  prefill tok/s, decode tok/s: from the deltas of llm.stats() over the run (the engine's own timers)
  counters (hits, misses, bytes, stall_s): deltas of llm.stats() over the run, per phase from the
    engine's prefill_* and decode_* counters
  hit rate = (hits + prefetch_hits) / (hits + prefetch_hits + misses + host_computed)
  stall share = decode stall_s / decode_s (the part of decode time spent waiting for expert loads)
  vs 1.0 = decode tok/s / decode tok/s at budget 1.0
  Each figure is the median over the R runs (counters too, run by run).

Units: seconds (s), tokens per second (tok/s), MB = 1e6 bytes, GB/s = 1e9 bytes per second.
  P = --prompt-tokens, N = --new-tokens, R = --repeats; budgets are fractions of all expert bytes.
  bg cpu: share of the machine's CPUs that other processes used during a measurement (/proc/stat
  busy time minus this process's CPU time); other work on the machine skews every figure here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import (
    GB,
    MB,
    background_cpu,
    cpu_snapshot,
    csv_text,
    fmt,
    make_prompt,
    warn_if_busy,
    write_results,
)
from bench.offload_store import StoreSession, add_store_arguments, drop_cached_pages, store_session
from moeinf import LLM, SamplingParams
from moeinf.runtime.scheduler import PHASE_COUNTERS

COUNTERS = PHASE_COUNTERS  # expert traffic the engine counts per phase
PHASES = ("prefill", "decode")


# ----------------------------------------------------------------------------- generation


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
    """(hits + prefetch_hits) / all expert uses (host-computed ones included); None when nothing was used."""
    used = c["hits"] + c["prefetch_hits"] + c["misses"] + c["host_computed"]
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


# ----------------------------------------------------------------------------- output

CSV_COLUMNS = (
    "budget", "slots", "prefill_tok_s", "decode_tok_s", "decode_vs_full", "hit_rate", "hits", "misses",
    "mb_from_disk", "mb_to_device", "stall_s", "decode_stall_s", "stall_share_of_decode",
    "prompt_tokens", "new_tokens", "repeats", "policy", "torch_threads", "processor", "store_fs", "timestamp_utc",
)  # fmt: skip


def csv_rows(results: dict) -> list[dict]:
    """One row per budget, with the run's settings, for spreadsheets."""
    machine = results["machine"]
    common = {
        **{k: results["parameters"][k] for k in ("prompt_tokens", "new_tokens", "repeats", "policy")},
        "torch_threads": machine["torch_threads"],
        "processor": machine["processor"],
        "store_fs": machine["store_filesystem"]["type"],
        "timestamp_utc": machine["timestamp_utc"],
    }
    return [
        {
            **{k: row[k] for k in ("budget", "slots", "prefill_tok_s", "decode_tok_s", "decode_vs_full", "hit_rate")},
            "hits": row["total"]["hits"],
            "misses": row["total"]["misses"],
            "mb_from_disk": row["total"]["bytes_from_disk"] / MB,
            "mb_to_device": row["total"]["bytes_to_device"] / MB,
            "stall_s": row["total"]["stall_s"],
            "decode_stall_s": row["decode"]["stall_s"],
            "stall_share_of_decode": row["stall_share_of_decode"],
            **common,
        }
        for row in results["budgets"]
    ]


def print_table(results: dict) -> None:
    """One row per budget."""
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
        f"(P={params['prompt_tokens']}, N={params['new_tokens']}, policy {params['policy']}, "
        f"host_budget {params['host_budget']}, host_compute {params['host_compute']}, "
        f"median of {params['repeats']}, {machine['torch_threads']} threads, float32, CPU; "
        "p+d = prefill + decode, MB = 1e6 bytes, per run;\n bg cpu = most of the CPUs other processes "
        "kept busy during a timed run)"
    )


def warn_if_noisy(results: dict, limit: float = 1.5) -> None:
    """Warns when the timed runs of a budget differ by more than `limit`x, or the machine was busy."""
    for r in results["budgets"]:
        if r["spread"] > limit:
            print(
                f"WARNING: budget {r['budget']:g}: timed runs differ by {r['spread']:.1f}x (other processes kept up to "
                f"{fmt(r['background_cpu_max'], '.0%')} of the CPUs busy); rerun or raise --repeats",
                file=sys.stderr,
            )
    warn_if_busy(results["machine"])


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_arguments(parser)
    parser.add_argument("--budgets", default="0.25,0.5,1.0", help="expert budgets, fractions of all expert bytes")
    parser.add_argument("--policy", default="lru", help="cache policy of the offloaded runs")
    parser.add_argument("--host-budget", type=float, default=0, help="host tier, a fraction of all expert bytes")
    parser.add_argument("--host-compute", default="never", choices=("never", "auto", "always"), help="hybrid placement")
    parser.add_argument("--name", default="offload-cpu", help="results file name (<out>/<name>.json and .csv)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length P")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run N (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds R; medians are reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
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


def time_budgets(args: argparse.Namespace, session: StoreSession) -> tuple[dict[float, list[dict]], dict[float, float]]:
    """One LLM per budget over the session's store: (runs per budget, seconds each LLM took to load)."""
    prompt = make_prompt(session.checkpoint.spec.vocab_size, args.prompt_tokens, args.seed)
    llms: dict[float, LLM] = {}
    load_s = {}
    try:
        for budget in args.budgets:
            start = time.perf_counter()
            llms[budget] = LLM(
                session.path, device="cpu", dtype="float32", progress=False,
                expert_budget=budget, host_budget=args.host_budget, offload_dir=session.folder, policy=args.policy,
                host_compute=args.host_compute,
            )  # fmt: skip
            load_s[budget] = time.perf_counter() - start
        store_file = session.store.path if any(b < 1 for b in args.budgets) else None
        return measure_generation(llms, prompt, args.new_tokens, args.repeats, store_file), load_s
    finally:
        for llm in llms.values():
            llm.close()


def results_object(
    args: argparse.Namespace, session: StoreSession, runs: dict[float, list[dict]], load_s: dict[float, float]
) -> dict:
    """What offload-cpu.json holds: the settings, the machine, and one row per budget."""
    total = session.store.num_layers * session.store.num_experts  # MoE layers x experts: every record
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
        "machine": session.machine,
        "model": session.model_summary(),
        "parameters": {
            "budgets": args.budgets, "policy": args.policy, "host_budget": args.host_budget,
            "host_compute": args.host_compute, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed, "dtype": "float32",
            "device": "cpu", "batch_size": 1, "offload_dir": str(session.folder),
            "offload_dir_temporary": session.temporary,
        },
        "store": session.store_summary(),
        "budgets": rows,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with store_session(args.model, args.offload_dir) as session:
        print(
            f"model {session.path}  budgets {args.budgets}  P={args.prompt_tokens} N={args.new_tokens} "
            f"R={args.repeats} threads={torch.get_num_threads()}\n{session.describe()}"
        )
        runs, load_s = time_budgets(args, session)
    results = results_object(args, session, runs, load_s)
    print_table(results)
    warn_if_noisy(results)
    write_results(args.out, args.name, results, csv_text(CSV_COLUMNS, csv_rows(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
