"""End-to-end CPU benchmark: moeinf against Hugging Face transformers on the same checkpoint.

Run:  python -m bench.e2e [--model DIR] [--prompt-tokens 128] [--new-tokens 64] [--repeats 3]
                          [--threads N] [--seed 0] [--out bench/results]

Both engines compute in float32 on the CPU, batch size 1, greedy decoding, on one fixed seeded
prompt of random token ids. Results go to <out>/e2e-cpu.json and <out>/e2e-cpu.csv.

Timing method (the same for both engines): wall-clock seconds around one whole `generate` call.
  prefill run: generate with 1 new token           -> time to first token, t_prefill
  full run:    generate with exactly N new tokens  -> t_full (moeinf: ignore_eos=True;
                                                      transformers: min_new_tokens = max_new_tokens = N)
  prefill tok/s = P / median(t_prefill)
  decode tok/s  = (N - 1) / (median(t_full) - median(t_prefill))
moeinf's own llm.stats() counters are not used for the figures, because transformers has no
equivalent; they are recorded in the JSON only as a cross-check.

Units and shapes:
  P = --prompt-tokens, N = --new-tokens, R = --repeats
  times in seconds, rates in tokens per second; ratio = moeinf / transformers (> 1: moeinf faster)
  transformers input_ids: [1, P] int64; moeinf prompt: list of P ints
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from bench.common import csv_text, fmt, machine_info, make_prompt, write_results
from bench.machine import load_average
from moeinf import LLM, SamplingParams, ensure_default_model

ENGINES = ("moeinf", "transformers")
MATCH_TOKENS = 8  # greedy tokens compared between the engines


# ----------------------------------------------------------------------------- machine and model


def model_summary(path: Path) -> dict:
    """Path and the config.json fields that size the model."""
    config = json.loads((path / "config.json").read_text())
    keys = (
        "architectures",
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_local_experts",
        "num_experts_per_tok",
        "vocab_size",
        "max_position_embeddings",
        "eos_token_id",
    )
    summary = {"path": str(path), **{k: config.get(k) for k in keys}}
    summary["stored_dtype"] = config.get("dtype", config.get("torch_dtype"))
    return summary


# ----------------------------------------------------------------------------- the two engines


class MoeinfRunner:
    """moeinf's LLM on the CPU, in float32 unless told otherwise."""

    def __init__(self, path: Path, dtype: str = "float32", name: str = "moeinf"):
        self.name = name
        start = time.perf_counter()
        self.llm = LLM(path, device="cpu", dtype=dtype, progress=False)
        self.load_s = time.perf_counter() - start

    def generate(self, prompt: list[int], new_tokens: int, exact: bool) -> list[int]:
        """Greedy generation; exact=True produces exactly `new_tokens` tokens (EOS ignored)."""
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=exact)
        return self.llm.generate(prompt, params)[0].token_ids


class TransformersRunner:
    """transformers' AutoModelForCausalLM in float32 on the CPU, greedy `generate`."""

    name = "transformers"

    def __init__(self, path: Path):
        start = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - start
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = min(self.eos_ids) if self.eos_ids else 0

    def generate(self, prompt: list[int], new_tokens: int, exact: bool) -> list[int]:
        """Greedy generation; exact=True produces exactly `new_tokens` tokens (EOS suppressed).

        Without exact, generation stops at EOS; the EOS is kept and any padding after it dropped.
        """
        input_ids = torch.tensor([prompt], dtype=torch.int64)  # [1, P]
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens if exact else 0,
                pad_token_id=self.pad_id,
            )  # [1, P + n]
        generated = out[0, len(prompt) :].tolist()
        for i, token in enumerate(generated):
            if token in self.eos_ids:
                return generated[: i + 1]
        return generated


# ----------------------------------------------------------------------------- measurement


def timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(runners: list, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """One warm-up, then `repeats` timed rounds, interleaving the engines.

    Each round runs, per engine, a prefill run (1 token) and a full run (exactly new_tokens).
    The engine order flips every round (A B, B A, ...) so drift in machine load hits both equally.
    Returns {engine: {"prefill_s": [R], "full_s": [R]}}.
    """
    for runner in runners:  # warm-up: allocator, thread pools, lazy inits
        runner.generate(prompt, 1, exact=True)
        runner.generate(prompt, new_tokens, exact=True)

    times = {r.name: {"prefill_s": [], "full_s": []} for r in runners}
    bar = tqdm(total=repeats * len(runners), desc="timed runs", unit="run")
    for round_index in range(repeats):
        order = runners if round_index % 2 == 0 else runners[::-1]
        for runner in order:
            bar.set_postfix_str(runner.name)
            prefill_s, first = timed(lambda: runner.generate(prompt, 1, exact=True))
            full_s, tokens = timed(lambda: runner.generate(prompt, new_tokens, exact=True))
            if len(first) != 1 or len(tokens) != new_tokens:
                raise RuntimeError(
                    f"{runner.name} produced {len(first)} and {len(tokens)} tokens, expected 1 and {new_tokens}"
                )
            times[runner.name]["prefill_s"].append(prefill_s)
            times[runner.name]["full_s"].append(full_s)
            bar.update()
    bar.close()
    return times


def summarise(samples: dict[str, list[float]], prompt_tokens: int, new_tokens: int) -> dict:
    """Medians and rates from one engine's raw times (see the module docstring)."""
    prefill_s = statistics.median(samples["prefill_s"])
    full_s = statistics.median(samples["full_s"])
    decode_s = full_s - prefill_s  # seconds for new_tokens - 1 decode steps
    return {
        "spread": max(samples["full_s"]) / min(samples["full_s"]),  # 1.0 = every full run took as long
        "prefill_s_median": prefill_s,
        "full_s_median": full_s,
        "decode_s": decode_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        # None when noise made the full run no slower than the prefill run
        "decode_tok_s": (new_tokens - 1) / decode_s if decode_s > 0 else None,
        "prefill_s": samples["prefill_s"],
        "full_s": samples["full_s"],
    }


def ratio(moeinf_rate: float | None, transformers_rate: float | None) -> float | None:
    """moeinf / transformers (> 1: moeinf faster), None when either rate is missing."""
    if moeinf_rate is None or transformers_rate is None:
        return None
    return moeinf_rate / transformers_rate


def check_tokens(runners: list, prompt: list[int]) -> dict:
    """The first MATCH_TOKENS greedy tokens of each engine, EOS honoured, and whether they agree."""
    tokens = {r.name: r.generate(prompt, MATCH_TOKENS, exact=False) for r in runners}
    first, second = (tokens[name] for name in ENGINES)
    return {"tokens_match": first == second, "tokens": tokens}


# ----------------------------------------------------------------------------- output


CSV_COLUMNS = (
    "engine", "prefill_tok_s", "decode_tok_s", "prefill_s_median", "full_s_median", "load_s",
    "prefill_ratio", "decode_ratio", "tokens_match", "prompt_tokens", "new_tokens", "repeats",
    "torch_threads", "processor", "timestamp_utc",
)  # fmt: skip


def csv_rows(results: dict) -> list[dict]:
    """One row per engine, plus the run's settings, for spreadsheets."""
    rows = []
    for name in ENGINES:
        engine = results["engines"][name]
        rows.append(
            {
                "engine": name,
                **{k: engine[k] for k in ("prefill_tok_s", "decode_tok_s", "prefill_s_median", "full_s_median")},
                "load_s": engine["load_s"],
                "prefill_ratio": results["ratios"]["prefill"],
                "decode_ratio": results["ratios"]["decode"],
                "tokens_match": results["tokens_match"],
                **{k: results[k] for k in ("prompt_tokens", "new_tokens", "repeats")},
                **{k: results["machine"][k] for k in ("torch_threads", "processor", "timestamp_utc")},
            }
        )
    return rows


def print_table(results: dict) -> None:
    """engine | prefill tok/s | decode tok/s, then the moeinf / transformers ratios."""
    print()
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name in ENGINES:
        engine = results["engines"][name]
        print(f"{name:<14}{fmt(engine['prefill_tok_s'], '.1f'):>15}{fmt(engine['decode_tok_s'], '.1f'):>15}")
    ratios = results["ratios"]
    print(f"{'moeinf/hf':<14}{fmt(ratios['prefill'], '.2f') + 'x':>15}{fmt(ratios['decode'], '.2f') + 'x':>15}")
    print(
        f"(P={results['prompt_tokens']}, N={results['new_tokens']}, median of {results['repeats']}, "
        f"{results['machine']['torch_threads']} threads, float32, CPU)"
    )


def warn_if_noisy(results: dict, limit: float = 1.5) -> None:
    """Warns when the timed runs of an engine differ by more than `limit`x (a busy machine)."""
    for name in ENGINES:
        spread = results["engines"][name]["spread"]
        if spread > limit:
            load = results["machine"]["load_average_start"]
            print(
                f"WARNING: {name}'s timed runs differ by {spread:.1f}x (load average {load} on "
                f"{results['machine']['cpu_count']} CPUs); the machine was busy, rerun or raise --repeats",
                file=sys.stderr,
            )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length P")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per full run N (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds R; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for e2e-cpu.json/.csv")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("expected --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("expected --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    path = args.model if args.model is not None else ensure_default_model()
    model = model_summary(path)
    prompt = make_prompt(model["vocab_size"], args.prompt_tokens, args.seed)
    machine = machine_info(transformers=transformers.__version__)

    print(
        f"model {path}  P={args.prompt_tokens} N={args.new_tokens} R={args.repeats} threads={torch.get_num_threads()}"
    )
    runners = [MoeinfRunner(path), TransformersRunner(path)]
    stats_before = runners[0].llm.stats()

    match = check_tokens(runners, prompt)
    if not match["tokens_match"]:
        print(
            f"WARNING: first greedy tokens differ: moeinf {match['tokens']['moeinf']} "
            f"vs transformers {match['tokens']['transformers']}",
            file=sys.stderr,
        )

    times = measure(runners, prompt, args.new_tokens, args.repeats)
    machine["load_average_end"] = load_average()

    engines = {}
    for runner in runners:
        summary = summarise(times[runner.name], args.prompt_tokens, args.new_tokens)
        engines[runner.name] = {"load_s": runner.load_s, **summary}
    stats_after = runners[0].llm.stats()
    engines["moeinf"]["internal_stats_delta"] = {k: stats_after[k] - stats_before[k] for k in stats_after}

    moe, hf = engines["moeinf"], engines["transformers"]
    results = {
        "benchmark": "e2e-cpu",
        "method": "wall-clock around generate(); prefill = P / median(t 1 token); "
        "decode = (N-1) / (median(t N tokens) - median(t 1 token)); warm-up 1 per engine; engines interleaved",
        "machine": machine,
        "model": model,
        "dtype": "float32",
        "device": "cpu",
        "batch_size": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "seed": args.seed,
        "tokens_match": match["tokens_match"],
        "first_tokens": match["tokens"],
        "engines": engines,
        "ratios": {
            "prefill": ratio(moe["prefill_tok_s"], hf["prefill_tok_s"]),
            "decode": ratio(moe["decode_tok_s"], hf["decode_tok_s"]),
        },
    }

    print_table(results)
    warn_if_noisy(results)
    print(f"first {MATCH_TOKENS} greedy tokens match: {results['tokens_match']}")

    write_results(args.out, "e2e-cpu", results, csv_text(CSV_COLUMNS, csv_rows(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
