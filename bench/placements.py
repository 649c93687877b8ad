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
from moeinf.runtime.replay.cost import HOSTS, Host, ReplayProfile, profile_for
from moeinf.runtime.replay.loop import replay
from moeinf.runtime.traces import Trace, read_trace, write_trace

DEFAULT = "activation-aware+host"  # the runtime's default configuration
HOST_CHOICES = (*HOSTS, "this")
CAPACITIES = (0.125, 0.25, 0.5)
BEGIN, END = "<!-- hybrid:begin (written by bench/policy.py --report --host) -->", "<!-- hybrid:end -->"
ITEMSIZE = {"float32": 4, "bfloat16": 2}


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


def run_configuration(trace: Trace, name: str, slots: int, link: str, host: Host, progress: bool = False) -> dict:
    """One configuration's figures: bench/policy.py's summary plus the host lane's counters."""
    profile = profile_for(trace, link, host=host)
    policy, placement = configurations(profile, slots, trace.num_experts)[name]
    result = replay(trace, policy, slots, profile, progress=progress, placement=placement)
    counters = result.counters
    return {
        **result.summary(),
        "host_computed": int(counters["host_computed"]),
        "promotions": int(counters["promotions"]),
        "promotion_hits": int(counters["promotion_hits"]),
    }


def _work(path: str, name: str, slots: int, link: str, host: Host) -> dict:
    return run_configuration(read_trace(path), name, slots, link, host)


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


def report(sources: list, out: Path, link: str, hosts: list[str], jobs: int) -> None:
    """Every source x capacity x host profile x configuration; writes <out>/policy-hybrid.json
    and the hybrid section of <out>/policy.md."""
    from bench.policy import slots_for  # bench.policy imports this module

    profiles = {h: host_profile(h, out) for h in hosts}
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
                pool.submit(_work, paths[name], n, slots_for(by_name[name], c), link, profiles[h]): (name, c, h, n)
                for name, c, h, n in todo
            }
            for future in tqdm(as_completed(futures), total=len(futures), desc="hybrid replays", unit="replay"):
                done[futures[future]] = future.result()
    results = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.policy " + " ".join(sys.argv[1:]),
        "link": link,
        "default": DEFAULT,
        "hosts": {h: vars(p) for h, p in profiles.items()},
        "workloads": {
            s.name: {str(c): {h: {n: done[(s.name, c, h, n)] for n in names} for h in hosts} for c in CAPACITIES}
            for s in sources
        },
    }
    write_text_atomic(out / "policy-hybrid.json", json.dumps(results, indent=1) + "\n")
    write_tables(results, out / "policy.md")


def write_tables(results: dict, path: Path) -> None:
    hosts = ", ".join(
        f"{h} ({p['bytes_per_s'] / 1e9:.0f} GB/s, {p['flops_per_s'] / 1e12:.1f} TFLOP/s)"
        for h, p in results["hosts"].items()
    )
    parts = [
        BEGIN,
        "",
        f"Written {results['written']} by `{results['command']}`; link {results['link']}; hosts {hosts}.",
        "Placements as bench/placements.py describes them; TPOT in virtual ms per decode token.",
        "",
    ]
    for name, capacities in results["workloads"].items():
        parts += [f"### {name}, hybrid", ""]
        for c, by_host in capacities.items():
            for h, configs in by_host.items():
                parts += [f"Capacity {float(c):.1%}, host {h}:", "", table(configs), ""]
    parts.append(END)
    text = "\n".join(parts)
    old = path.read_text() if path.exists() else "# Policy replay\n"
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        text = old.rstrip("\n") + "\n\n## Hybrid placement\n\n" + text + "\n"
    write_text_atomic(path, text)
