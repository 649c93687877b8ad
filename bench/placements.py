"""Hybrid placements replayed beside the fetch-only policies: the runtime's default and the peers',
every one through the same CacheController (moeinf/runtime/cache/placement.py decides per miss).

  lru, activation-aware  fetch every miss over the link (MoE-Infinity's design, this runtime's before)
  host-only              no routed expert on the device: KTransformers, llama.cpp -ot exps=CPU
  static-split           the first capacity / E layers' experts on the device (fetched on first use,
                         never evicted), every other layer's on the host: llama.cpp --n-cpu-moe
  lru+host               an LRU device cache, misses computed on the host and promoted one at a
                         time while the link is idle (llama.cpp's expert-cache work)
  activation-aware+host  the runtime's default: host_compute="auto" (per miss, the cheaper of the
                         host and fetch + device compute), promotions ranked and victims picked by
                         the activation-aware policy

Run through bench/policy.py: `--trace T --capacity C --profile pcie4 --host ddr4 [--json]` for one
trace, `--report --host ddr4,ddr5` for every workload, capacity and host profile (the hybrid
tables of bench/results/policy.md, figures in policy-hybrid.json). Host profiles: ddr4 and ddr5
(moeinf/runtime/replay/cost.py HOSTS), or `this`: the machine running the replay, calibrated from
bench/results/host-experts-cpu.json (its 1-token GB/s for bandwidth, its best FLOP rate).

With `--expert-format F` (int8, int4, int4-g64, int4-g128: cost.py EXPERT_FORMATS) the routed
experts are costed as stored in F (dense layers unchanged), and `--report` writes
policy-hybrid-F.json and its own section of policy.md (between the markers of `markers(F)`),
which opens with F's default TPOT against the native default's of policy-hybrid.json at the same
workload, capacity and host, and the fastest placement of each cell. `--workloads` narrows the
report to the workloads whose names contain one of its substrings; the file and section then hold
just those.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from moeinf.atomic_write import write_text_atomic
from moeinf.runtime.cache.placement import Placement
from moeinf.runtime.replay.cost import HOSTS, NATIVE, Host, ReplayProfile, profile_for
from moeinf.runtime.replay.loop import replay
from moeinf.runtime.traces import Trace, read_trace, write_trace

DEFAULT = "activation-aware+host"  # the runtime's default configuration
HOST_CHOICES = (*HOSTS, "this")
CAPACITIES = (0.125, 0.25, 0.5)
BEGIN, END = "<!-- hybrid:begin (written by bench/policy.py --report --host) -->", "<!-- hybrid:end -->"
NATIVE_DTYPES = {4: "float32", 2: "bf16", 1: "fp8"}  # a native ModelCost's bytes_per_param -> its dtype
ITEMSIZE = {"float32": 4, "bfloat16": 2}


def markers(expert_format: str = NATIVE) -> tuple[str, str, str]:
    """(begin, end, heading) of the policy.md section the hybrid report of `expert_format` writes:
    the native experts' section, or one of its own per format."""
    if expert_format == NATIVE:
        return BEGIN, END, "## Hybrid placement"
    return (
        f"<!-- hybrid-{expert_format}:begin (written by bench/policy.py --report --host --expert-format "
        f"{expert_format}) -->",
        f"<!-- hybrid-{expert_format}:end -->",
        f"## Hybrid placement, {expert_format} experts",
    )


def results_name(expert_format: str = NATIVE) -> str:
    """The results file of the hybrid report of `expert_format`."""
    return "policy-hybrid.json" if expert_format == NATIVE else f"policy-hybrid-{expert_format}.json"


def host_profile(name: str, results: Path) -> Host:
    """ddr4 / ddr5, or `this` machine from its bench/host_experts.py figures."""
    if name in HOSTS:
        return HOSTS[name]
    if name != "this":
        raise SystemExit(f"--host: expected one of {', '.join(HOST_CHOICES)}, found {name!r}")
    path = results / "host-experts-cpu.json"
    if not path.exists():
        raise SystemExit(f"--host this: expected {path} (python -m bench.host_experts --json writes it), found none")
    rows = json.loads(path.read_text())["rows"]
    bandwidth = statistics.median(r["gbps"] * 1e9 for r in rows if r["tokens"] == 1)
    flops = max(2 * r["tokens"] * r["gbps"] * 1e9 / ITEMSIZE[r["dtype"]] for r in rows)
    return Host("this", bytes_per_s=bandwidth, flops_per_s=flops)


def configurations(profile: ReplayProfile, slots: int, num_experts: int) -> dict[str, tuple[str, Placement | None]]:
    """name -> (policy, placement) of every configuration compared (see the module docstring)."""
    return {
        "lru": ("lru", None),
        "activation-aware": ("activation-aware", None),
        "host-only": ("lru", Placement("always", promote=False)),
        "static-split": ("lru", Placement("always", promote=False, device_layers=slots // num_experts)),
        "lru+host": ("lru", Placement("always")),
        DEFAULT: ("activation-aware", Placement("auto", profile.expert_costs())),
    }


def run_configuration(
    trace: Trace, name: str, slots: int, link: str, host: Host, progress: bool = False, expert_format: str = NATIVE
) -> dict:
    """One configuration's figures: bench/policy.py's summary plus the host lane's counters, with
    the routed experts in `expert_format` (cost.py EXPERT_FORMAT_CHOICES)."""
    profile = profile_for(trace, link, host=host, expert_format=expert_format)
    policy, placement = configurations(profile, slots, trace.num_experts)[name]
    result = replay(trace, policy, slots, profile, progress=progress, placement=placement)
    counters = result.counters
    return {
        **result.summary(),
        "host_computed": int(counters["host_computed"]),
        "promotions": int(counters["promotions"]),
        "promotion_hits": int(counters["promotion_hits"]),
    }


def _work(path: str, name: str, slots: int, link: str, host: Host, expert_format: str) -> dict:
    return run_configuration(read_trace(path), name, slots, link, host, expert_format=expert_format)


def table(configs: dict[str, dict], fetch_lru: str = "lru") -> str:
    lines = [
        "| placement | TPOT ms | vs fetch-only LRU | hit rate | host-computed | promotions (later hits) | GB moved |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = configs[fetch_lru]["tpot_s"]
    for name, r in configs.items():
        label = f"**{name}** (default)" if name == DEFAULT else name
        lines.append(
            f"| {label} | {r['tpot_s'] * 1e3:.1f} | {r['tpot_s'] / base:.2f}x | {r['hit_rate']:.1%} | "
            f"{r.get('host_computed', 0)} | {r.get('promotions', 0)} ({r.get('promotion_hits', 0)}) | "
            f"{r['bytes'] / 1e9:.1f} |"
        )
    return "\n".join(lines)


def report(sources: list, out: Path, link: str, hosts: list[str], jobs: int, expert_format: str = NATIVE) -> None:
    """Every source x capacity x host profile x configuration, the routed experts in
    `expert_format`; writes <out>/results_name(expert_format) and that format's section of
    <out>/policy.md (markers(expert_format)), leaving the rest of the file as it was."""
    from bench.policy import slots_for  # bench.policy imports this module

    profiles = {h: host_profile(h, out) for h in hosts}
    models = {s.name: profile_for(s.trace, link, expert_format=expert_format).model for s in sources}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {s.name: os.path.join(tmp, f"{s.name}.npz") for s in sources}
        for s in sources:
            write_trace(paths[s.name], s.trace)
        by_name = {s.name: s.trace for s in sources}
        names = list(configurations(profile_for(sources[0].trace, link, host=HOSTS["ddr4"]), 1, 1))
        todo = [(s.name, c, h, n) for s in sources for c in CAPACITIES for h in hosts for n in names]
        done = {}
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(_work, paths[job[0]], job[3], slots_for(by_name[job[0]], job[1]), link, profiles[job[2]],
                            expert_format): job
                for job in todo  # job: (name, capacity, host, configuration)
            }  # fmt: skip
            for future in tqdm(as_completed(futures), total=len(futures), desc="hybrid replays", unit="replay"):
                done[futures[future]] = future.result()
    results = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.policy " + " ".join(sys.argv[1:]),
        "link": link,
        "default": DEFAULT,
        "expert_format": expert_format,
        "hosts": {h: vars(p) for h, p in profiles.items()},
        "expert_mb": {s.name: models[s.name].expert_bytes / 1e6 for s in sources},
        "model_cost": {s.name: models[s.name].name for s in sources},
        "workloads": {
            s.name: {str(c): {h: {n: done[(s.name, c, h, n)] for n in names} for h in hosts} for c in CAPACITIES}
            for s in sources
        },
    }
    if expert_format != NATIVE:
        native_path = out / results_name(NATIVE)
        native = json.loads(native_path.read_text()) if native_path.exists() else None
        native_dtypes = {
            s.name: NATIVE_DTYPES.get(profile_for(s.trace, link).model.bytes_per_param, "native") for s in sources
        }
        results["vs_native"] = versus_native(results, native, native_dtypes)
    write_text_atomic(out / results_name(expert_format), json.dumps(results, indent=1) + "\n")
    write_tables(results, out / "policy.md")


def versus_native(results: dict, native: dict | None, native_dtypes: dict[str, str]) -> dict:
    """Per workload, capacity and host of `results` (a quantized-expert report): its default's TPOT
    beside the native report's (None where `native`, policy-hybrid.json's figures, lacks the cell or
    was replayed on another link or host profile), its fastest placement, and the fastest other than
    the default (the runner-up, when the default is the fastest).
    {"written": native's, "cells": [{"workload", "native_dtype", "capacity", "host", "native_tpot_s",
    "tpot_s", "ratio", "fastest", "fastest_tpot_s", "runner_up", "runner_up_tpot_s"}]}; TPOT in s."""
    default = results["default"]
    cells = []
    for name, capacities in results["workloads"].items():
        for c, by_host in capacities.items():
            for h, configs in by_host.items():
                native_tpot = None
                if (
                    native is not None
                    and native["link"] == results["link"]
                    and native["hosts"].get(h) == results["hosts"][h]
                ):
                    cell = native["workloads"].get(name, {}).get(c, {}).get(h, {})
                    native_tpot = cell.get(default, {}).get("tpot_s")
                tpot = configs[default]["tpot_s"]
                fastest = min(configs, key=lambda n: configs[n]["tpot_s"])
                runner_up = min((n for n in configs if n != default), key=lambda n: configs[n]["tpot_s"])
                cells.append(
                    {
                        "workload": name,
                        "native_dtype": native_dtypes[name],
                        "capacity": float(c),
                        "host": h,
                        "native_tpot_s": native_tpot,
                        "tpot_s": tpot,
                        "ratio": None if native_tpot is None else tpot / native_tpot,
                        "fastest": fastest,
                        "fastest_tpot_s": configs[fastest]["tpot_s"],
                        "runner_up": runner_up,
                        "runner_up_tpot_s": configs[runner_up]["tpot_s"],
                    }
                )
    return {"written": None if native is None else native["written"], "cells": cells}


def versus_table(results: dict) -> str:
    """The table of versus_native's cells, and a line on where the default stands among the placements."""
    fmt, default = results["expert_format"], results["default"]
    lines = [
        f"| workload | capacity | host | default TPOT ms, native | default TPOT ms, {fmt} | {fmt} / native | "
        f"fastest {fmt} placement |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for cell in results["vs_native"]["cells"]:
        native, ratio = cell["native_tpot_s"], cell["ratio"]
        native_label = "-" if native is None else f"{native * 1e3:.1f} ({cell['native_dtype']})"
        if cell["fastest"] == default or cell["fastest_tpot_s"] == cell["tpot_s"]:
            fastest = "the default"
        else:
            fastest = f"{cell['fastest']} ({cell['fastest_tpot_s'] / cell['tpot_s']:.2f}x the default's TPOT)"
        lines.append(
            f"| {cell['workload']} | {cell['capacity']:.1%} | {cell['host']} | {native_label} | "
            f"{cell['tpot_s'] * 1e3:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | {fastest} |"
        )
    cells = results["vs_native"]["cells"]
    wins = [c for c in cells if c["runner_up_tpot_s"] >= c["tpot_s"]]
    closest = min(cells, key=lambda c: c["runner_up_tpot_s"] / c["tpot_s"])
    lines += [
        "",
        f"The default is the fastest {fmt} placement in {len(wins)} of {len(cells)} cells; closest: "
        f"{closest['runner_up']} at {closest['runner_up_tpot_s'] / closest['tpot_s']:.4f}x the default's TPOT "
        f"({closest['workload']}, {closest['capacity']:.1%}, {closest['host']}).",
    ]
    return "\n".join(lines)


def write_tables(results: dict, path: Path) -> None:
    hosts = ", ".join(
        f"{h} ({p['bytes_per_s'] / 1e9:.0f} GB/s, {p['flops_per_s'] / 1e12:.1f} TFLOP/s)"
        for h, p in results["hosts"].items()
    )
    fmt = results.get("expert_format", NATIVE)
    begin, end, heading = markers(fmt)
    parts = [
        begin,
        "",
        f"Written {results['written']} by `{results['command']}`; link {results['link']}; hosts {hosts}.",
        "Placements as bench/placements.py describes them; TPOT in virtual ms per decode token.",
        "",
    ]
    if fmt != NATIVE:
        sizes = ", ".join(f"{name} {mb:.1f} MB" for name, mb in results["expert_mb"].items())
        written = results["vs_native"]["written"]
        parts += [
            f"Routed experts stored as {fmt} (moeinf/runtime/replay/cost.py EXPERT_FORMATS; one expert: {sizes}); "
            "dense layers, router and FLOPs as in the native tables above. The default against the native "
            f"experts' default at the same workload, capacity and host ({results_name(NATIVE)}"
            f"{'' if written is None else f', written {written}'}), and the fastest {fmt} placement of each cell:",
            "",
            versus_table(results),
            "",
        ]
    for name, capacities in results["workloads"].items():
        parts += [f"### {name}, hybrid{'' if fmt == NATIVE else f', {fmt} experts'}", ""]
        for c, by_host in capacities.items():
            for h, configs in by_host.items():
                parts += [f"Capacity {float(c):.1%}, host {h}:", "", table(configs), ""]
    parts.append(end)
    text = "\n".join(parts)
    old = path.read_text() if path.exists() else "# Policy replay\n"
    if begin in old and end in old:
        text = old[: old.index(begin)] + text + old[old.index(end) + len(end) :]
    else:
        text = old.rstrip("\n") + f"\n\n{heading}\n\n" + text + "\n"
    write_text_atomic(path, text)
