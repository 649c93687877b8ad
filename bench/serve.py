"""Serving benchmark: C concurrent clients against `moeinf serve`'s server, with three batching
settings, against the same server answering one prompt per generate call, in the same run.

Run:  python -m bench.serve [--model DIR] [--clients 8] [--requests 3] [--prompt-tokens 32]
                            [--new-tokens 32] [--budgets 0.25,0.5,1] [--out bench/results]

Each of C client threads sends R requests one after another (a request: P random token ids,
N greedy tokens, ignore_eos), all clients at once, over HTTP to a CompletionServer on loopback.
All configurations serve the same requests from the same LLM (the default model unless --model),
at each expert budget of --budgets (a fraction of the expert bytes; 1: all resident):

  batched    max_batch_prompts = C: waiting requests share a generate call
  fitting    the server's default: as many as the expert slots serve (server.fitting_batch)
  one-by-one max_batch_prompts = 1: every request is a generate call of its own

  throughput = C * R * N / wall seconds of all requests (generated tokens per second)
  latency    = median seconds from sending a request to its whole answer
  over_one_by_one = a configuration's throughput / one-by-one's (> 1: its batching pays)

Greedy answers must be the same in every configuration (checked). Results: <out>/serve-cpu.json.

Batching trades expert traffic for compute: a step of B prompts routes to the union of their
experts, so under a tight budget the step's working set can outgrow the slots and the batch loads
more than the prompts one by one would (expert_misses in the results).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from bench.machine import cpu_model, load_average
from moeinf import LLM, SamplingParams, ensure_default_model
from moeinf.atomic_write import write_text_atomic
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.serve.http_server import CompletionServer

# name -> max_batch_prompts: "clients" batches every waiting request, None the server's default
CONFIGS = {"batched": "clients", "fitting": None, "one-by-one": 1}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def run_clients(server: CompletionServer, bodies: list[list[dict]], bar: tqdm) -> tuple[float, list[float], list]:
    """bodies: [C][R] requests; client c sends its R in order. Returns (wall seconds, latencies,
    answers [C][R] token id lists)."""
    url = server.url + "/v1/completions"
    latencies: list[float] = []
    answers = [[None] * len(b) for b in bodies]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r, body in enumerate(bodies[c]):
            start = time.perf_counter()
            reply = post(url, body)
            with lock:
                latencies.append(time.perf_counter() - start)
                answers[c][r] = reply["choices"][0]["token_ids"]
                bar.update()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(bodies))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client, sent one after another")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budgets", default="0.25,0.5,1", help="expert budgets, fractions (1: all resident)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    model = args.model or ensure_default_model()
    budgets = [float(b) for b in args.budgets.split(",")]
    rng = random.Random(args.seed)
    vocab = Checkpoint.open(model).spec.vocab_size  # the config alone: no weights loaded for it
    bodies = [
        [
            {
                "prompt": [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)],
                "max_tokens": args.new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            for _ in range(args.requests)
        ]
        for _ in range(args.clients)
    ]
    total = args.clients * args.requests
    results = {}
    with tqdm(total=total * len(CONFIGS) * len(budgets), desc="requests", unit="req") as bar:
        for budget in budgets:
            llm = LLM(model, progress=False, expert_budget=None if budget >= 1 else budget)
            warm_up = SamplingParams(max_new_tokens=2)  # first-call costs stay out of the timings
            llm.generate([bodies[0][0]["prompt"]], warm_up)
            results[str(budget)], answers = {}, {}
            for name, max_batch in CONFIGS.items():
                cap = args.clients if max_batch == "clients" else max_batch
                server = CompletionServer(llm, ("127.0.0.1", 0), "bench", cap, log_requests=False)
                server.start()
                thread = threading.Thread(target=server.serve_forever, daemon=True)
                thread.start()
                before = llm.stats()
                try:
                    seconds, latencies, answers[name] = run_clients(server, bodies, bar)
                finally:
                    server.shutdown()
                    server.server_close()
                after = llm.stats()
                results[str(budget)][name] = {
                    "tokens_per_s": total * args.new_tokens / seconds,
                    "wall_s": seconds,
                    "median_latency_s": statistics.median(latencies),
                    "generate_calls": len(server.batch_sizes),
                    "mean_batch_prompts": statistics.mean(server.batch_sizes),
                    "expert_misses": after["misses"] - before["misses"],
                    "mb_to_device": (after["bytes_to_device"] - before["bytes_to_device"]) / 1e6,
                }
            llm.close()
            if any(answers[name] != answers["one-by-one"] for name in CONFIGS):
                print(f"error: greedy answers differ between the configurations at budget {budget}", file=sys.stderr)
                return 1
            cell = results[str(budget)]
            for name in CONFIGS:
                cell[name]["over_one_by_one"] = cell[name]["tokens_per_s"] / cell["one-by-one"]["tokens_per_s"]
    report = {
        "benchmark": "serve",
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "load_average": load_average(),
        },
        "model": str(Path(model).name),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "results": results,
    }
    header = ("budget", "config", "tok/s", "x one-by-one", "median latency s", "calls", "prompts/call", "misses")
    print("{:>6s} {:12s} {:>8s} {:>13s} {:>17s} {:>6s} {:>13s} {:>7s}".format(*header))
    for budget, cell in results.items():
        for name in CONFIGS:
            r = cell[name]
            print(
                f"{budget:>6s} {name:12s} {r['tokens_per_s']:8.1f} {r['over_one_by_one']:13.2f} "
                f"{r['median_latency_s']:17.2f} {r['generate_calls']:6d} {r['mean_batch_prompts']:13.2f} "
                f"{r['expert_misses']:7.0f}"
            )
    print("greedy answers equal in every configuration at every budget")
    path = Path(args.out) / "serve-cpu.json"
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
