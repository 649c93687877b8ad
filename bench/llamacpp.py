"""CPU prefill and decode: moeinf against llama.cpp on the same weights, in alternating rounds.

Run:  python -m bench.llamacpp [--model DIR] [--types f32,bf16] [--prompt-tokens 128]
                               [--new-tokens 64] [--repeats 5] [--threads N] [--out bench/results]

The checkpoint (default: moeinf's built-in default model) is converted to GGUF by our own
converter (bench/gguf_convert.py, with the `gguf` package) once per type and kept in
$MOEINF_CACHE_DIR/gguf/. llama.cpp runs through llama-cpp-python in a worker process
(bench/llamacpp_worker.py) in the benchmark's own environment, $MOEINF_CACHE_DIR/bench-llamacpp,
which is made on first use: pip builds llama.cpp from source there, about 17 minutes on 2 cores
(a progress bar counts the build steps). Nothing of this is part of the test suite.

Per type (f32: moeinf float32 against the f32 GGUF; bf16: moeinf bfloat16 against the bf16 GGUF),
llama.cpp's KV cache in that type too (its default, f16, would round every cached key and value):
both engines greedy, batch 1, the same seeded prompt of random ids, the same thread count
(torch's and llama.cpp's n_threads); timing as bench/e2e.py (wall clock around a whole generate:
prefill tok/s = P / median t(1 token), decode tok/s = (N - 1) / (median t(N) - median t(1)); one
warm-up each, engine order flipped every round). Agreement: the greedy tokens of both over N
tokens (the number of leading tokens that agree) and, from the prompt's last position, the largest
logit difference relative to the largest logit. Results: <out>/llamacpp-cpu.json and .csv;
ratio = moeinf / llama.cpp (> 1: moeinf faster).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import csv_text, fmt, machine_info, make_prompt, write_results
from bench.e2e import MoeinfRunner, measure, model_summary, summarise
from bench.machine import load_average
from moeinf import ensure_default_model
from moeinf.loaders.default_model import cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
ENV_PACKAGES = (
    LLAMA_CPP_PYTHON,
    "gguf",
    "numpy",
    "safetensors",
    "tqdm",
    "torch==2.13.0",
)  # torch pinned: the CPU build
ENV_IMPORTS = "import llama_cpp, gguf, numpy, safetensors, tqdm, torch"
BUILD_STEP = re.compile(r"\[(\d+)/(\d+)\]")  # ninja's "[n/total]" lines in pip's verbose output
MOEINF_DTYPES = {"f32": "float32", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------- its own environment


def env_dir() -> Path:
    return cache_dir() / "bench-llamacpp"


def env_python() -> Path:
    return env_dir() / "bin" / "python"


def env_ready() -> bool:
    if not env_python().exists():
        return False
    return subprocess.run([str(env_python()), "-c", ENV_IMPORTS], capture_output=True).returncode == 0


def ensure_env() -> None:
    """Makes the benchmark's environment unless it is there; pip's build steps as a progress bar."""
    if env_ready():
        return
    log_path = env_dir().parent / "bench-llamacpp-install.log"
    print(
        f"installing {LLAMA_CPP_PYTHON} into {env_dir()}: pip builds llama.cpp from source, "
        f"about 17 minutes on 2 cores (log: {log_path})",
        file=sys.stderr,
    )
    env_dir().parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(env_dir())], check=True)
    command = [str(env_python()), "-m", "pip", "install", "-v", *ENV_PACKAGES]
    bar = tqdm(desc="building llama.cpp", unit="step")
    with (
        open(log_path, "w") as log,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip,
    ):
        for line in pip.stdout:
            log.write(line)
            step = BUILD_STEP.search(line)
            if step:
                bar.total = int(step.group(2))
                bar.update(int(step.group(1)) - bar.n)
    bar.close()
    if pip.returncode != 0 or not env_ready():
        raise SystemExit(f"installing {LLAMA_CPP_PYTHON} failed (exit {pip.returncode}); see {log_path}")


def gguf_file(model: Path, type_name: str) -> Path:
    """The checkpoint as GGUF of `type_name`, converted unless a conversion newer than it exists."""
    out = cache_dir() / "gguf" / f"{model.name}-{type_name}.gguf"
    newest = max(p.stat().st_mtime for p in model.iterdir())
    if not out.exists() or out.stat().st_mtime < newest:
        command = [str(env_python()), "-m", "bench.gguf_convert", str(model), str(out), "--type", type_name]
        subprocess.run(command, cwd=REPO_ROOT, check=True)
    return out


# ----------------------------------------------------------------------------- llama.cpp's runner


class LlamaCppRunner:
    """A bench/llamacpp_worker.py process holding one GGUF model; the same calls as MoeinfRunner."""

    name = "llama.cpp"

    def __init__(self, model: Path, threads: int, context: int, kv_type: str):
        start = time.perf_counter()
        command = [str(env_python()), "-m", "bench.llamacpp_worker", str(model)]
        command += ["--threads", str(threads), "--context", str(context), "--kv-type", kv_type]
        self.worker = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.generate([1], 1, exact=True)  # answers once the model is loaded
        self.load_s = time.perf_counter() - start

    def _ask(self, request: dict) -> dict:
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (code {self.worker.poll()}) on {request['op']}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the llama.cpp worker answered: {answer['error']}")
        return answer

    def generate(self, prompt: list[int], new_tokens: int, exact: bool) -> list[int]:
        return self._ask({"op": "generate", "prompt": prompt, "new_tokens": new_tokens, "exact": exact})["tokens"]

    def logits(self, prompt: list[int]) -> torch.Tensor:
        return torch.tensor(self._ask({"op": "logits", "prompt": prompt})["logits"], dtype=torch.float32)  # [V]

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.worker.stdin.close()
            self.worker.wait(timeout=60)


# ----------------------------------------------------------------------------- one type


def agreement(moeinf: MoeinfRunner, peer: LlamaCppRunner, prompt: list[int], new_tokens: int) -> dict:
    """Greedy tokens of both (EOS ignored) and the prompt's last-position logits, compared."""
    ours, theirs = moeinf.generate(prompt, new_tokens, exact=True), peer.generate(prompt, new_tokens, exact=True)
    leading = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    our_logits = moeinf.llm.logits(prompt)[-1]  # [V]
    their_logits = peer.logits(prompt)
    scale = our_logits.abs().max().item()
    return {
        "greedy_tokens_agreeing": leading,
        "greedy_tokens_compared": new_tokens,
        "logits_max_diff_rel": (our_logits - their_logits).abs().max().item() / scale,
        "moeinf_tokens": ours,
        "llamacpp_tokens": theirs,
    }


def run_type(model: Path, type_name: str, prompt: list[int], args: argparse.Namespace) -> dict:
    threads = torch.get_num_threads()
    moeinf = MoeinfRunner(model, MOEINF_DTYPES[type_name])
    context = len(prompt) + args.new_tokens + 8
    peer = LlamaCppRunner(gguf_file(model, type_name), threads, context, kv_type=type_name)
    try:
        agree = agreement(moeinf, peer, prompt, args.new_tokens)
        times = measure([moeinf, peer], prompt, args.new_tokens, args.repeats)
    finally:
        peer.close()
    engines = {
        r.name: {"load_s": r.load_s, **summarise(times[r.name], len(prompt), args.new_tokens)} for r in (moeinf, peer)
    }
    ours, theirs = engines["moeinf"], engines["llama.cpp"]

    def ratio(key: str) -> float | None:
        return ours[key] / theirs[key] if ours[key] and theirs[key] else None

    return {
        "type": type_name,
        "moeinf_dtype": MOEINF_DTYPES[type_name],
        "engines": engines,
        "ratios": {"prefill": ratio("prefill_tok_s"), "decode": ratio("decode_tok_s")},
        "agreement": agree,
    }


# ----------------------------------------------------------------------------- main


CSV_COLUMNS = (
    "type", "moeinf_prefill_tok_s", "llamacpp_prefill_tok_s", "prefill_ratio", "moeinf_decode_tok_s",
    "llamacpp_decode_tok_s", "decode_ratio", "greedy_tokens_agreeing", "greedy_tokens_compared",
    "logits_max_diff_rel", "prompt_tokens", "new_tokens", "repeats", "threads", "processor", "timestamp_utc",
)  # fmt: skip


def csv_rows(results: dict) -> list[dict]:
    rows = []
    for row in results["types"]:
        ours, theirs = row["engines"]["moeinf"], row["engines"]["llama.cpp"]
        rows.append(
            {
                "type": row["type"],
                "moeinf_prefill_tok_s": ours["prefill_tok_s"],
                "llamacpp_prefill_tok_s": theirs["prefill_tok_s"],
                "prefill_ratio": row["ratios"]["prefill"],
                "moeinf_decode_tok_s": ours["decode_tok_s"],
                "llamacpp_decode_tok_s": theirs["decode_tok_s"],
                "decode_ratio": row["ratios"]["decode"],
                **{k: row["agreement"][k] for k in ("greedy_tokens_agreeing", "greedy_tokens_compared")},
                "logits_max_diff_rel": row["agreement"]["logits_max_diff_rel"],
                **{k: results[k] for k in ("prompt_tokens", "new_tokens", "repeats", "threads")},
                **{k: results["machine"][k] for k in ("processor", "timestamp_utc")},
            }
        )
    return rows


def print_table(results: dict) -> None:
    print()
    print(f"{'type':<6}{'engine':<11}{'prefill tok/s':>15}{'decode tok/s':>14}   greedy agreement")
    for row in results["types"]:
        for name, engine in row["engines"].items():
            print(
                f"{row['type']:<6}{name:<11}{fmt(engine['prefill_tok_s'], '.1f'):>15}{fmt(engine['decode_tok_s'], '.1f'):>14}"
            )
        agree, ratios = row["agreement"], row["ratios"]
        print(
            f"{'':<6}{'ratio':<11}{fmt(ratios['prefill'], '.2f') + 'x':>15}{fmt(ratios['decode'], '.2f') + 'x':>14}"
            f"   {agree['greedy_tokens_agreeing']}/{agree['greedy_tokens_compared']} tokens, "
            f"logits within {agree['logits_max_diff_rel']:.1e}"
        )
    print(
        f"(P={results['prompt_tokens']}, N={results['new_tokens']}, median of {results['repeats']}, {results['threads']} threads)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument("--types", default="f32,bf16", help=f"comma-separated, of {', '.join(MOEINF_DTYPES)}")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length P")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per full run N (>= 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds R; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="threads of both engines (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for llamacpp-cpu.json/.csv")
    args = parser.parse_args(argv)
    args.types = args.types.split(",")
    unknown = [t for t in args.types if t not in MOEINF_DTYPES]
    if unknown:
        parser.error(f"expected --types of {', '.join(MOEINF_DTYPES)}, found {', '.join(unknown)}")
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("expected --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ensure_env()
    model = args.model if args.model is not None else ensure_default_model()
    summary = model_summary(model)
    prompt = make_prompt(summary["vocab_size"], args.prompt_tokens, args.seed)
    machine = machine_info(llama_cpp_python=LLAMA_CPP_PYTHON.split("==")[1])
    rows = [run_type(model, type_name, prompt, args) for type_name in args.types]
    machine["load_average_end"] = load_average()
    results = {
        "benchmark": "llamacpp-cpu",
        "method": "wall-clock around a whole greedy generate; prefill = P / median(t 1 token); "
        "decode = (N-1) / (median(t N tokens) - median(t 1 token)); warm-up 1 per engine; engines alternate",
        "machine": machine,
        "model": summary,
        "batch_size": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "types": rows,
    }
    print_table(results)
    write_results(args.out, "llamacpp-cpu", results, csv_text(CSV_COLUMNS, csv_rows(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
