"""Policy replay benchmark: every cache policy on a trace, against Belady's optimum and the bound.

Run:
  python -m bench.policy --trace FILE.npz --capacity 0.25 [--profile pcie4|pcie5|nvme] [--json]
                         [--host ddr4|ddr5|this] [--expert-format native|int8|int4|int4-g64|int4-g128]
  python -m bench.policy --report [--out bench/results] [--jobs 2] [--only POLICY,...]
  python -m bench.policy --report --host ddr4,ddr5 [--out bench/results] [--jobs 2]
                         [--expert-format int4] [--workloads mixtral,...]

With --host, the hybrid placements of bench/placements.py (misses computed on that host) are
replayed beside the fetch-only policies, and --json adds "default": the name of the runtime's
default configuration; --report --host writes the hybrid tables instead of the policy tables.
--expert-format costs the routed experts as stored in that format (moeinf/runtime/replay/cost.py
EXPERT_FORMATS: bytes from the record layout, FLOPs and dense layers unchanged; native: the
model's own, bf16 for Mixtral and Qwen3, FP8 for DeepSeek-V3); with --report --host a quantized
format writes policy-hybrid-FORMAT.json and its own section of policy.md, beside the native one.
--workloads keeps the report's workloads whose names contain one of its comma-separated substrings.

The first form replays FILE through moeinf's CacheController with each policy registered in
moeinf.runtime.cache.registry.POLICIES at run time (lru, lfu, and activation-aware / lookahead once
registered) and Belady's MIN, with capacity * layers * experts device slots, over the virtual
link of the profile (moeinf/runtime/replay/ documents the timing model and its numbers). It prints
a table, or with --json exactly
  {"policies": {"lru": {"hit_rate", "misses", "bytes", "stall_s", "tpot_s"}, ...},
   "bound": {"tpot_s"}}.

Columns: hit rate = (hits + prefetch hits) / accesses, a prefetch still in flight when needed
counting as a hit; ready hits = the same without those late prefetches (the layer waits for them
as for a miss); gap = the share of the LRU -> Belady hit-rate gap a policy closes (LRU 0, Belady
1; above 1 where prefetch hits count); TPOT = virtual seconds per decode token; / bound =
TPOT over the lower bound (per token, the larger of its compute and the time to move Belady's
loads at this capacity). All figures are virtual time, so they do not depend on the machine
replaying, only on the trace, the capacity and the profile.

--report replays the shared real traces (../shared/traces) and the synthetic workloads of
bench/synthetic.py at 12.5%, 25% and 50% capacity and writes <out>/policy.json, the hit-rate plot
<out>/policy.png, and the tables of <out>/policy.md (between its table markers; the prose around
them is kept). With --only, just the named policies are replayed (a policy registered since the
last report, say) and every other figure is kept from the existing policy.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from bench import placements, synthetic
from moeinf.atomic_write import atomic_write, write_text_atomic
from moeinf.runtime.cache.registry import POLICIES
from moeinf.runtime.replay.belady import BeladyPolicy, lower_bound_tpot
from moeinf.runtime.replay.cost import EXPERT_FORMAT_CHOICES, LINKS, MODELS, NATIVE, ReplayProfile, profile_for
from moeinf.runtime.replay.loop import replay
from moeinf.runtime.replay.result import ReplayResult
from moeinf.runtime.traces import Trace, read_trace, write_trace

CAPACITIES = (0.125, 0.25, 0.5)
LINK_CAPACITY = 0.25  # the capacity the real traces are also replayed at on every link
BEGIN, END = "<!-- tables:begin (written by bench/policy.py --report) -->", "<!-- tables:end -->"


def policy_names() -> list[str]:
    """Every policy to compare: those registered now, in registration order, then Belady."""
    return [*POLICIES, BeladyPolicy.name]


def slots_for(trace: Trace, capacity: float) -> int:
    """capacity: a fraction of all (layer, expert) pairs (<= 1), or a slot count (> 1)."""
    if capacity > 1:
        return int(capacity)
    return max(1, round(capacity * trace.num_layers * trace.num_experts))


def derived(policies: dict[str, dict], bound_tpot_s: float) -> dict[str, dict]:
    """Per policy: the share of the LRU -> Belady hit-rate gap it closes, and TPOT over the bound."""
    lru, best = policies["lru"]["hit_rate"], policies[BeladyPolicy.name]["hit_rate"]
    gap = best - lru
    return {
        name: {
            "gap_captured": (r["hit_rate"] - lru) / gap if gap > 0 else None,
            "tpot_over_bound": r["tpot_s"] / bound_tpot_s if bound_tpot_s > 0 else None,
        }
        for name, r in policies.items()
    }


def table(policies: dict[str, dict], bound_tpot_s: float) -> str:
    extra = derived(policies, bound_tpot_s)
    lines = [
        "| policy | hit rate | ready hits | misses | prefetches | GB moved | stall s | TPOT ms | gap | TPOT / bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in policies.items():
        gap, over = extra[name]["gap_captured"], extra[name]["tpot_over_bound"]
        lines.append(
            f"| {name} | {r['hit_rate']:.1%} | {r['ready_hit_rate']:.1%} | {r['misses']} | {r['prefetches']} | "
            f"{r['bytes'] / 1e9:.1f} | {r['stall_s']:.2f} | {r['tpot_s'] * 1e3:.2f} | "
            f"{'-' if gap is None else f'{gap:.0%}'} | {'-' if over is None else f'{over:.2f}'} |"
        )
    lines.append(f"| bound | | | | | | | {bound_tpot_s * 1e3:.2f} | | 1.00 |")
    return "\n".join(lines)


def run_one(
    trace: Trace, name: str, slots: int, link: str, progress: bool, expert_format: str = NATIVE
) -> tuple[dict, float | None]:
    """One policy's summary with the report's extra figures, and the lower bound when the policy
    is Belady; the routed experts in `expert_format` (cost.py EXPERT_FORMAT_CHOICES)."""
    profile = profile_for(trace, link, expert_format=expert_format)
    result: ReplayResult = replay(trace, name, slots, profile, progress=progress)
    bound = lower_bound_tpot(result, profile) if name == BeladyPolicy.name else None
    extra = {
        "ready_hit_rate": result.ready_hit_rate,
        "prefetches": int(result.counters["prefetches"]),
        "late_prefetch_hits": result.late_prefetch_hits,
    }
    return {**result.summary(), **extra}, bound


def compare(trace: Trace, slots: int, link: str, progress: bool, expert_format: str = NATIVE) -> dict:
    """{"policies": {name: summary and extra figures}, "bound": {"tpot_s"}} for every policy."""
    policies, bound = {}, None
    for name in tqdm(policy_names(), desc="policies", unit="policy", disable=not progress):
        policies[name], b = run_one(trace, name, slots, link, progress, expert_format)
        bound = b if b is not None else bound
    return {"policies": policies, "bound": {"tpot_s": bound}}


# ---------------------------------------------------------------------------------- --report


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    trace: Trace
    real: bool


def wanted(name: str, workloads: list[str] | None) -> bool:
    """Whether workload `name` is one `workloads` (substrings; None: every workload) asks for."""
    return workloads is None or any(w in name for w in workloads)


def report_sources(workloads: list[str] | None = None) -> list[Source]:
    """The shared real traces (where present) and the synthetic workloads; with `workloads`, those
    whose names contain one of its substrings (none matching is an error)."""
    sources = []
    for file in synthetic.REAL_TRACES:
        path = synthetic.SHARED_TRACES / file
        if path.exists() and wanted(file.removesuffix(".npz"), workloads):
            trace = read_trace(path)
            sources.append(
                Source(file.removesuffix(".npz"), f"real: {', '.join(trace.meta.get('sequences', []))}", trace, True)
            )
    # Sizes are bounded by replay speed. Evictions no longer bound it: the residency keeps its
    # evictable set as arrays over the slots (runtime/cache/residency.py), so a victim at DeepSeek's shape
    # and 25% costs ~11 us (bench/scorer.py) where scanning every slot in Python cost ~1.4 ms, and a
    # DeepSeek replay at 25% takes 0.1-0.4 ms per layer-step (lru to lookahead; 2-core VM), 3 ms before.
    skewed = ("arxiv", "github", "wikipedia")  # the domains whose routing skews most (C4 and books stay nearer uniform)
    synthetic_workloads = {
        "synthetic-mixtral": synthetic.Workload(model="mixtral-8x7b", sequences=48, min_tokens=32, max_tokens=64),
        "synthetic-qwen3": synthetic.Workload(
            model="qwen3-30b-a3b", sequences=16, min_tokens=16, max_tokens=16, tasks=skewed
        ),
        "synthetic-deepseek": synthetic.Workload(
            model="deepseek-v3", sequences=12, min_tokens=16, max_tokens=16, tasks=skewed
        ),
    }
    chosen = {name: w for name, w in synthetic_workloads.items() if wanted(name, workloads)}
    if not sources and not chosen:
        known = [f.removesuffix(".npz") for f in synthetic.REAL_TRACES] + list(synthetic_workloads)
        raise SystemExit(
            f"--workloads: expected substrings of the workload names ({', '.join(known)}; the real ones where "
            f"{synthetic.SHARED_TRACES} holds them), found {','.join(workloads)!r}, matching none"
        )
    for name, w in tqdm(chosen.items(), desc="generate", unit="workload"):
        trace = synthetic.generate(w)
        description = (
            f"synthetic {w.model} shape, {w.sequences} sequences x "
            f"{w.min_tokens if w.min_tokens == w.max_tokens else f'{w.min_tokens}-{w.max_tokens}'} tokens "
            f"from {len(w.tasks)} tasks, seed {w.seed}"
        )
        sources.append(Source(name, description, trace, False))
    return sources


def _work(path: str, name: str, slots: int, link: str) -> tuple[dict, float | None]:
    return run_one(read_trace(path), name, slots, link, progress=False)


def trace_digest(trace: Trace) -> str:
    """Identifies a workload's routing, so --only can tell whether kept results still apply."""
    h = hashlib.sha1()
    for array in (trace.experts, trace.seq_starts, trace.phase, trace.lookahead):
        if array is not None:
            h.update(array.tobytes())
    return h.hexdigest()


def previous_figures(
    previous: dict, name: str, digest: str, c: float, policy: str, lk: str
) -> tuple[dict, float | None]:
    """One replay's (summary, bound) from an earlier policy.json, for --only."""
    w = previous.get("workloads", {}).get(name)
    if w is None or w.get("trace_sha1") != digest:
        raise SystemExit(f"--only: {name} in the existing policy.json is missing or was another trace; rerun in full")
    entry = w["capacities"].get(str(c)) if lk == previous["link"] else None
    entry = entry or w.get("links", {}).get(lk)
    if entry is None or policy not in entry["policies"]:
        raise SystemExit(f"--only: no {policy} result for {name} at {c:.1%} on {lk} to keep; rerun in full")
    return entry["policies"][policy], entry["bound"]["tpot_s"] if policy == BeladyPolicy.name else None


def report(out: Path, link: str, jobs: int, only: list[str] | None = None) -> None:
    """Replays every workload; with `only`, replays just those policies and keeps the others'
    figures from the existing <out>/policy.json (same traces, checked by digest)."""
    out.mkdir(parents=True, exist_ok=True)
    names = policy_names()
    previous = json.loads((out / "policy.json").read_text()) if only else None
    if only and previous["link"] != link:
        raise SystemExit(f"--only: the existing policy.json is for link {previous['link']}, not {link}")
    with tempfile.TemporaryDirectory() as tmp:
        sources = report_sources()
        paths = {s.name: os.path.join(tmp, f"{s.name}.npz") for s in sources}  # for the worker processes
        for s in sources:
            write_trace(paths[s.name], s.trace)
        by_name = {s.name: s.trace for s in sources}
        digests = {s.name: trace_digest(s.trace) for s in sources}
        # every capacity on the main link; the real traces at 25% on every link as well
        jobs_ = {(s.name, c, n, link) for s in sources for c in CAPACITIES for n in names}
        jobs_ |= {(s.name, LINK_CAPACITY, n, other) for s in sources if s.real for n in names for other in LINKS}
        done: dict[tuple[str, float, str, str], tuple[dict, float | None]] = {}
        if only:
            kept = {job for job in jobs_ if job[2] not in only}
            done = {job: previous_figures(previous, job[0], digests[job[0]], *job[1:]) for job in kept}
            jobs_ -= kept

        def cost(job: tuple[str, float, str, str]) -> float:
            """Replay time grows with tokens, layers, and the slots scanned per miss."""
            t = by_name[job[0]]
            return t.num_tokens * t.num_layers**2 * t.num_experts

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(_work, paths[name], n, slots_for(by_name[name], c), lk): (name, c, n, lk)
                for name, c, n, lk in sorted(jobs_, key=cost, reverse=True)  # biggest first: workers end together
            }
            for future in tqdm(as_completed(futures), total=len(futures), desc="replays", unit="replay"):
                done[futures[future]] = future.result()

    def figures(name: str, c: float, lk: str) -> dict:
        policies = {n: done[(name, c, n, lk)][0] for n in names}
        bound = done[(name, c, BeladyPolicy.name, lk)][1]
        return {"policies": policies, "bound": {"tpot_s": bound}, "derived": derived(policies, bound)}

    results = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.policy " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.system()}, Python {platform.python_version()} (virtual time)",
        "link": link,
        "policies": names,
        "models": {
            m.name: {
                "expert_mb": m.expert_bytes / 1e6,
                "layer_decode_ms": sum(ReplayProfile(link, LINKS[link], m).layer_s(1, m.top_k)) * 1e3,
                "resident_tpot_ms": ReplayProfile(link, LINKS[link], m).decode_compute_s() * 1e3,
                "load_ms": {lk: m.expert_bytes / bw * 1e3 for lk, bw in LINKS.items()},
            }
            for m in MODELS.values()
        },
        "workloads": {},
    }
    for s in sources:
        profile = profile_for(s.trace, link)
        entry = {
            "description": s.description,
            "shape": [s.trace.num_layers, s.trace.num_experts, s.trace.top_k],
            "sequences": s.trace.num_sequences,
            "tokens": s.trace.num_tokens,
            "model_cost": profile.model.name,
            "trace_sha1": digests[s.name],
            "capacities": {str(c): {"slots": slots_for(s.trace, c), **figures(s.name, c, link)} for c in CAPACITIES},
        }
        if s.real:
            entry["links"] = {lk: figures(s.name, LINK_CAPACITY, lk) for lk in LINKS}
        results["workloads"][s.name] = entry
    write_text_atomic(out / "policy.json", json.dumps(results, indent=1) + "\n")
    plot(results, out / "policy.png")
    write_tables(results, out / "policy.md")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    fig, axes = plt.subplots(2, len(workloads), figsize=(3.6 * len(workloads), 6.4), sharey=True, squeeze=False)
    for column, (name, w) in enumerate(workloads.items()):
        capacities = [float(c) for c in w["capacities"]]
        L, E, K = w["shape"]
        for row, (key, label) in enumerate((("hit_rate", "hit rate (%)"), ("ready_hit_rate", "ready hit rate (%)"))):
            ax = axes[row][column]
            for policy in results["policies"]:
                hit = [w["capacities"][str(c)]["policies"][policy][key] for c in capacities]
                style = "k--" if policy == BeladyPolicy.name else "-o"
                ax.plot([c * 100 for c in capacities], [h * 100 for h in hit], style, label=policy, markersize=4)
            ax.set_title(f"{name}\n{L}x{E} top-{K}", fontsize=9)
            ax.set_xlabel("capacity (% of experts)")
            ax.set_xticks([c * 100 for c in capacities])
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel(label)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb", durable=False) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_tables(results: dict, path: Path) -> None:
    links = list(next(iter(results["models"].values()))["load_ms"])
    parts = [
        BEGIN,
        "",
        f"Written {results['written']} by `{results['command']}`; link profile {results['link']} unless said.",
        "",
        "Costs per model (moeinf/runtime/replay/cost.py states the sources):",
        "",
        "| model | expert MB | decode ms per layer | ms per token, all resident | "
        + " | ".join(f"load ms, {lk}" for lk in links)
        + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in links) + " |",
    ]
    for name, m in results["models"].items():
        loads = " | ".join(f"{m['load_ms'][lk]:.2f}" for lk in links)
        parts.append(
            f"| {name} | {m['expert_mb']:.1f} | {m['layer_decode_ms']:.3f} | {m['resident_tpot_ms']:.2f} | {loads} |"
        )
    parts.append("")
    for name, w in results["workloads"].items():
        L, E, K = w["shape"]
        parts += [
            f"### {name}",
            "",
            (
                f"{w['description']}; {L} layers x {E} experts, top-{K}; {w['sequences']} sequences, {w['tokens']} "
                f"tokens; costs of {w['model_cost']}."
            ),
            "",
        ]
        for c, entry in w["capacities"].items():
            parts += [
                f"Capacity {float(c):.1%} ({entry['slots']} slots):",
                "",
                table(entry["policies"], entry["bound"]["tpot_s"]),
                "",
            ]
        if "links" in w:
            lks = list(w["links"])
            parts += [
                f"TPOT (ms) at {LINK_CAPACITY:.0%} capacity on each link:",
                "",
                "| policy | " + " | ".join(lks) + " |",
                "| --- | " + " | ".join("---:" for _ in lks) + " |",
            ]
            for policy in results["policies"]:
                row = " | ".join(f"{w['links'][lk]['policies'][policy]['tpot_s'] * 1e3:.1f}" for lk in lks)
                parts.append(f"| {policy} | {row} |")
            parts.append(
                "| bound | " + " | ".join(f"{w['links'][lk]['bound']['tpot_s'] * 1e3:.1f}" for lk in lks) + " |"
            )
            parts.append("")
    parts.append(END)
    text = "\n".join(parts)
    old = path.read_text() if path.exists() else f"# Policy replay\n\n{BEGIN}\n{END}\n"
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        text = old.rstrip("\n") + "\n\n" + text + "\n"
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", help="trace file (.npz)")
    parser.add_argument("--capacity", type=float, default=0.25, help="fraction of all experts (<= 1) or slots (> 1)")
    parser.add_argument("--profile", default="pcie4", choices=["pcie4", "pcie5", "nvme"])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--report", action="store_true", help="replay the shared and synthetic workloads")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="with --report: replay only these policies (comma-separated), keep the rest")
    parser.add_argument(
        "--host",
        help=f"host profile(s) for the hybrid placements (bench/placements.py), of {', '.join(placements.HOST_CHOICES)}; "
        "comma-separated with --report",
    )
    parser.add_argument(
        "--expert-format",
        default=NATIVE,
        choices=EXPERT_FORMAT_CHOICES,
        help="how the routed experts are stored (moeinf/runtime/replay/cost.py EXPERT_FORMATS); native: the model's own",
    )
    parser.add_argument(
        "--workloads",
        help="with --report --host: only the workloads whose names contain one of these (comma-separated)",
    )
    args = parser.parse_args(argv)

    if args.report and not args.host and (args.expert_format != NATIVE or args.workloads):
        parser.error(
            "--expert-format and --workloads: expected --report --host (the policy tables are of every workload's "
            "native experts), found --report without --host"
        )
    if args.report and args.host:
        sources = report_sources(args.workloads.split(",") if args.workloads else None)
        placements.report(sources, Path(args.out), args.profile, args.host.split(","), args.jobs, args.expert_format)
        return
    if args.report:
        report(Path(args.out), args.profile, args.jobs, args.only.split(",") if args.only else None)
        return
    if not args.trace:
        parser.error("--trace is required (or --report)")
    trace = read_trace(args.trace)
    slots = slots_for(trace, args.capacity)
    fmt = args.expert_format
    figures = compare(trace, slots, args.profile, progress=True, expert_format=fmt)  # bars go to stderr
    if args.host:
        host = placements.host_profile(args.host, Path(args.out))
        profile = profile_for(trace, args.profile, host=host, expert_format=fmt)
        for name in placements.configurations(profile, slots, trace.num_experts):
            if name not in figures["policies"]:  # the fetch-only ones are there already
                figures["policies"][name] = placements.run_configuration(
                    trace, name, slots, args.profile, host, expert_format=fmt
                )
        figures["default"] = placements.DEFAULT
    if args.json:
        keys = ("hit_rate", "misses", "bytes", "stall_s", "tpot_s")  # the promised schema, nothing more
        policies = {name: {k: r[k] for k in keys} for name, r in figures["policies"].items()}
        promised = {"policies": policies, "bound": figures["bound"]}
        if args.host:
            promised["default"] = figures["default"]
        print(json.dumps(promised))
        return
    profile = profile_for(trace, args.profile, expert_format=fmt)
    print(
        f"{args.trace}: {trace.num_sequences} sequences, {trace.num_tokens} tokens, "
        f"{trace.num_layers}x{trace.num_experts} top-{trace.top_k}; {slots} slots; {args.profile}; {fmt} experts "
        f"({profile.model.expert_bytes / 1e6:.1f} MB each, {profile.load_s * 1e3:.2f} ms per expert load, "
        f"{profile.decode_compute_s() * 1e3:.2f} ms per token resident)"
    )
    if args.host:
        print(placements.table(figures["policies"]))
        return
    print(table(figures["policies"], figures["bound"]["tpot_s"]))


if __name__ == "__main__":
    main()
