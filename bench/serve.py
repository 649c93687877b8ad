"""Serving benchmark: a bounded Poisson load of streamed completions from C loopback clients against
`moeinf serve`'s server, continuous batching against the generate-call batching it replaced,
both measured in the same run, at each expert budget.

Run:  python -m bench.serve [--model DIR] [--clients 8] [--requests 32] [--rate 4]
                            [--budgets 1,0.5] [--seed 0] [--out bench/results]

Requests arrive as a Poisson process of --rate a second (seeded); at most C are outstanding (a
request arriving when all C clients wait on answers waits for one: the load is bounded). Each is
a streamed greedy completion (ignore_eos) of a prompt of 8..96 random token ids and 4..64 new
tokens, drawn from the seed. Both engines serve the same requests, in the same order and at the
same arrival times, through the same FastAPI server on loopback:

  continuous     runtime/engine_loop.py: requests join and leave the running batch between decode
                 steps (up to as many as the expert slots serve, fitting_batch)
  call-granular  the engine before it: waiting requests with the same sampling settings share one
                 LLM.generate call (the same cap), and a request arriving mid-call waits for the
                 whole call; requests of different lengths have different settings, so rarely share

  throughput  generated tokens / seconds from the first arrival to the last answer
  TTFT        seconds from a request's arrival to its first token (p50, p99)
  TPOT        seconds per token after the first, per request (p50, p99)

Greedy answers must be the same under both engines (checked). Results: <out>/serve-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import random
import statistics
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import openai
import torch
from tqdm import tqdm

from bench.machine import cpu_model, load_average
from moeinf import LLM, SamplingParams, ensure_default_model
from moeinf.atomic_write import write_text_atomic
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.runtime.engine_loop import EngineClosing, EngineLoop, RequestHandle, fitting_batch
from moeinf.serve.server import Server, bind_port

PROMPT_TOKENS = (8, 96)
NEW_TOKENS = (4, 64)


class CallBatcher:
    """The generate-call batching moeinf served with before continuous batching, kept as this
    benchmark's baseline with the engine loop's interface (submit / cancel / close): a thread
    takes the oldest waiting request and every waiting one with the same settings, up to
    max_running, and runs them as one LLM.generate call. Cancelling has no effect on a running call."""

    def __init__(self, llm: LLM, max_running: int):
        self.llm, self.max_running = llm, max_running
        self.batch_sizes: list[int] = []  # prompts per generate call
        self._waiting: deque[RequestHandle] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams, listener=None) -> RequestHandle:
        handle = RequestHandle(self.llm.prompt_ids(prompt, params.max_new_tokens), params, self, listener)
        with self._cv:
            if self._stopping:
                raise EngineClosing("expected a running engine, found one shutting down")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        pass

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()

    def _batch(self) -> list[RequestHandle]:
        with self._cv:
            while not self._waiting and not self._stopping:
                self._cv.wait()
            if not self._waiting:
                return []
            first = self._waiting.popleft()
            batch = [first]
            for handle in list(self._waiting):
                if handle.params == first.params and len(batch) < self.max_running:
                    self._waiting.remove(handle)
                    batch.append(handle)
            return batch

    def _run(self) -> None:
        while batch := self._batch():
            self.batch_sizes.append(len(batch))

            def on_token(place: int, token: int, reason: str | None) -> None:
                batch[place]._emit((token, reason))

            try:
                outputs = self.llm.generate([h.prompt_token_ids for h in batch], batch[0].params, on_token=on_token)
            except Exception as error:  # noqa: BLE001 - every request of the call fails with it
                for handle in batch:
                    handle.done.set_exception(error)
                    handle._emit(None)
                continue
            for handle, output in zip(batch, outputs):
                handle.done.set_result(output)
                handle._emit(None)


def workload(rng: random.Random, vocab: int, requests: int, rate: float) -> list[dict]:
    """[requests] of {"at": arrival seconds, "prompt": ids, "max_tokens": n}."""
    at, work = 0.0, []
    for _ in range(requests):
        at += rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*PROMPT_TOKENS))]
        work.append({"at": at, "prompt": prompt, "max_tokens": rng.randint(*NEW_TOKENS)})
    return work


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def drive(url: str, work: list[dict], clients: int, bar: tqdm) -> dict:
    """Sends `work` at its arrival times, at most `clients` outstanding; returns the figures and
    the greedy answers."""
    slots = threading.Semaphore(clients)
    answers, ttft, tpot = [None] * len(work), [], []
    lock = threading.Lock()
    errors: queue.SimpleQueue = queue.SimpleQueue()
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int, arrived: float) -> None:
        try:
            tokens, first = [], None
            stream = client.completions.create(
                model="bench",
                prompt=work[i]["prompt"],
                max_tokens=work[i]["max_tokens"],
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if first is None:
                    first = time.perf_counter()
                tokens += chunk.choices[0].model_extra["token_ids"]
            end = time.perf_counter()
            with lock:
                answers[i] = tokens
                ttft.append(first - arrived)
                if len(tokens) > 1:
                    tpot.append((end - first) / (len(tokens) - 1))
                bar.update()
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.put(error)
        finally:
            slots.release()

    threads, start = [], time.perf_counter()
    for i, request in enumerate(work):
        delay = start + request["at"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrived = time.perf_counter()
        slots.acquire()  # bounded: waits while every client is busy
        thread = threading.Thread(target=one, args=(i, arrived))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if not errors.empty():
        raise errors.get()
    generated = sum(len(a) for a in answers)
    return {
        "figures": {
            "tokens_per_s": generated / seconds,
            "wall_s": seconds,
            "ttft_p50_s": percentile(ttft, 0.5),
            "ttft_p99_s": percentile(ttft, 0.99),
            "tpot_p50_s": percentile(tpot, 0.5),
            "tpot_p99_s": percentile(tpot, 0.99),
        },
        "answers": answers,
    }


def serve_with(llm: LLM, engine) -> tuple[Server, threading.Thread]:
    server = Server(llm, bind_port("127.0.0.1", 0), ["bench"], log_requests=False, engine=engine)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument("--clients", type=int, default=8, help="requests outstanding at most")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=4.0, help="mean arrivals a second (Poisson)")
    parser.add_argument("--budgets", default="1,0.5", help="expert budgets, fractions (1: all resident)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    model = args.model or ensure_default_model()
    budgets = [float(b) for b in args.budgets.split(",")]
    vocab = Checkpoint.open(model).spec.vocab_size  # the config alone: no weights loaded for it
    work = workload(random.Random(args.seed), vocab, args.requests, args.rate)
    engines = ("continuous", "call-granular")
    results = {}
    with tqdm(total=args.requests * len(engines) * len(budgets), desc="requests", unit="req") as bar:
        for budget in budgets:
            llm = LLM(model, progress=False, expert_budget=None if budget >= 1 else budget)
            llm.generate([work[0]["prompt"]], SamplingParams(max_new_tokens=2))  # first-call costs stay out
            spec = llm.spec
            cap = fitting_batch(spec.num_moe_layers, spec.num_experts, spec.top_k, llm.experts.num_slots)
            cell, answers = {}, {}
            for name in engines:
                engine = EngineLoop(llm, cap) if name == "continuous" else CallBatcher(llm, cap)
                server, thread = serve_with(llm, engine)
                try:
                    measured = drive(server.url, work, args.clients, bar)
                finally:
                    server.stop()
                    thread.join()
                answers[name] = measured["answers"]
                sizes = engine.batch_sizes
                cell[name] = {**measured["figures"], "max_running": cap, "mean_batch": statistics.mean(sizes)}
            llm.close()
            if answers["continuous"] != answers["call-granular"]:
                print(f"error: greedy answers differ between the engines at budget {budget}", file=sys.stderr)
                return 1
            base = cell["call-granular"]
            cell["continuous"]["throughput_over_call_granular"] = (
                cell["continuous"]["tokens_per_s"] / base["tokens_per_s"]
            )
            cell["continuous"]["ttft_p99_over_call_granular"] = cell["continuous"]["ttft_p99_s"] / base["ttft_p99_s"]
            results[str(budget)] = cell
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
    header = ("budget", "engine", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "batch")
    print("{:>6s} {:14s} {:>8s} {:>9s} {:>9s} {:>9s} {:>9s} {:>6s}".format(*header))
    for budget, cell in results.items():
        for name in engines:
            r = cell[name]
            print(
                f"{budget:>6s} {name:14s} {r['tokens_per_s']:8.1f} {r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f} "
                f"{r['tpot_p50_s']:9.4f} {r['tpot_p99_s']:9.4f} {r['mean_batch']:6.2f}"
            )
        c = cell["continuous"]
        print(
            f"{budget:>6s} continuous / call-granular: throughput {c['throughput_over_call_granular']:.2f}x, "
            f"TTFT p99 {c['ttft_p99_over_call_granular']:.2f}x"
        )
    print("greedy answers equal under both engines at every budget")
    path = Path(args.out) / "serve-cpu.json"
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
