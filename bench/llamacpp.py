"""CPU prefill and decode: moeinf against llama.cpp on the same weights, in alternating rounds.

Run:  python -m bench.llamacpp [--model DIR] [--types f32,bf16,int8,int4] [--prompt-tokens 128]
                               [--new-tokens 64] [--repeats 5] [--threads N] [--out bench/results]

The checkpoint (default: moeinf's built-in default model) is converted to GGUF by our own
converter (bench/gguf_convert.py, with the `gguf` package) once per type and kept in
$MOEINF_CACHE_DIR/gguf/. llama.cpp runs through llama-cpp-python in a worker process
(bench/llamacpp_worker.py) in the benchmark's own environment, $MOEINF_CACHE_DIR/bench-llamacpp,
which is made on first use: pip builds llama.cpp from source there, about 17 minutes on 2 cores
(a progress bar counts the build steps). Nothing of this is part of the test suite.

Per type (TYPES), the same weights in both engines:
    type  moeinf LLM(dtype, expert_dtype)   GGUF (bench/gguf_convert.py --type)   llama.cpp KV cache
    f32   float32, float32                  f32: every matrix F32                  f32
    bf16  bfloat16, bfloat16                bf16: every matrix BF16                bf16
    int8  float32, int8 (per channel)       q8_0-experts: experts Q8_0, rest F32   f32
    int4  float32, int4 (groups of 32)      q4_0-experts: experts Q4_0, rest F32   f32
(the KV cache in the dense layers' type: llama.cpp's default, f16, would round every cached key and
value). int8 / int4 quantize the same routed experts to nearest by each engine's own rules, so their
weights differ by the rounding: moeinf's int8 has one scale per output channel, Q8_0 one per 32
inputs; moeinf's int4 scale is max(-min / 8, max / 7) of a group of 32, Q4_0's the signed extreme
/ -8 (see moeinf/kernels/quantize.py and bench/gguf_convert.py); llama.cpp's CPU dot products with
Q8_0 / Q4_0 weights also quantize the activations to Q8_0 blocks, moeinf's keep them float32.
Both engines greedy, batch 1, the same seeded prompt of random ids, the same thread count (torch's
and llama.cpp's n_threads); timing as bench/e2e.py (wall clock around a whole generate: prefill
tok/s = P / median t(1 token), decode tok/s = (N - 1) / (median t(N) - median t(1)); one warm-up
each, engine order flipped every round). Agreement: the greedy tokens of both over N tokens (the
number of leading tokens that agree) and, from the prompt's last position, the largest logit
difference relative to moeinf's largest logit. Greedy agreement between the engines is not expected
for int8 / int4 (different weights); for every type but f32 each engine is also compared with its
own f32 run (moeinf float32; llama.cpp on the f32 GGUF), the same two measures, in the JSON's
"against_f32" (the f32 row's outputs, or, without an f32 row, the f32 engines loaded once for it).
Results: <out>/llamacpp-cpu.json and .csv, with the machine; ratio = moeinf / llama.cpp (> 1:
moeinf faster).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import csv_text, fmt, machine_info, make_prompt, write_results
from bench.e2e import MoeinfRunner, measure, model_summary, summarise
from bench.machine import load_average
from moeinf import LLM, ensure_default_model
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


@dataclass(frozen=True)
class BenchType:
    """One --types entry: moeinf's dtype and expert_dtype, the GGUF type llama.cpp runs
    (bench/gguf_convert.py's --type) and llama.cpp's KV cache type (the worker's --kv-type)."""

    dtype: str
    expert_dtype: str
    gguf: str
    kv: str


TYPES = {
    "f32": BenchType("float32", "float32", "f32", "f32"),
    "bf16": BenchType("bfloat16", "bfloat16", "bf16", "bf16"),
    "int8": BenchType("float32", "int8", "q8_0-experts", "f32"),
    "int4": BenchType("float32", "int4", "q4_0-experts", "f32"),
}
REFERENCE = "f32"  # each engine's own run every other type is compared with


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


# ----------------------------------------------------------------------------- the two runners


class MoeinfTypeRunner(MoeinfRunner):
    """bench/e2e.py's MoeinfRunner with the routed experts in `expert_dtype` (dense layers in
    `dtype`); the same calls as LlamaCppRunner."""

    def __init__(self, path: Path, dtype: str, expert_dtype: str):
        self.name = "moeinf"
        start = time.perf_counter()
        self.llm = LLM(path, device="cpu", dtype=dtype, expert_dtype=expert_dtype, progress=False)
        self.load_s = time.perf_counter() - start

    def logits(self, prompt: list[int]) -> torch.Tensor:
        return self.llm.logits(prompt)[-1]  # [V] float32, the prompt's last position

    def close(self) -> None:
        self.llm.close()


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


def outputs(runner: MoeinfTypeRunner | LlamaCppRunner, prompt: list[int], new_tokens: int) -> dict:
    """What the engines are compared on: greedy tokens (EOS ignored) and the prompt's last logits [V]."""
    return {"tokens": runner.generate(prompt, new_tokens, exact=True), "logits": runner.logits(prompt)}


def compared(ours: dict, theirs: dict) -> dict:
    """Two outputs(): the leading greedy tokens that agree, and the largest logit difference
    relative to the largest |logit| of `ours`."""
    a, b = ours["tokens"], theirs["tokens"]
    leading = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    scale = ours["logits"].abs().max().item()
    return {
        "greedy_tokens_agreeing": leading,
        "greedy_tokens_compared": len(a),
        "logits_max_diff_rel": (ours["logits"] - theirs["logits"]).abs().max().item() / scale,
    }


def agreement(ours: dict, theirs: dict) -> dict:
    """moeinf's outputs() against llama.cpp's, with both token lists."""
    return {**compared(ours, theirs), "moeinf_tokens": ours["tokens"], "llamacpp_tokens": theirs["tokens"]}


def runners(model: Path, type_name: str, prompt: list[int], args: argparse.Namespace):
    """The two engines of one type, loaded (moeinf first)."""
    spec = TYPES[type_name]
    moeinf = MoeinfTypeRunner(model, spec.dtype, spec.expert_dtype)
    context = len(prompt) + args.new_tokens + 8
    try:
        peer = LlamaCppRunner(gguf_file(model, spec.gguf), torch.get_num_threads(), context, kv_type=spec.kv)
    except BaseException:
        moeinf.close()
        raise
    return moeinf, peer


def reference_outputs(model: Path, prompt: list[int], args: argparse.Namespace) -> dict:
    """{engine: outputs()} of the f32 engines, loaded for this and closed again."""
    moeinf, peer = runners(model, REFERENCE, prompt, args)
    try:
        return {r.name: outputs(r, prompt, args.new_tokens) for r in (moeinf, peer)}
    finally:
        peer.close()
        moeinf.close()


def run_type(model: Path, type_name: str, prompt: list[int], args: argparse.Namespace, references: dict) -> dict:
    """One type's row. references: {engine: outputs()} of the f32 run, filled by the f32 row or, for
    the first other type before it, by reference_outputs."""
    spec = TYPES[type_name]
    if type_name != REFERENCE and not references:
        print(f"{type_name}: loading the f32 engines for the comparison against f32", file=sys.stderr)
        references.update(reference_outputs(model, prompt, args))
    moeinf, peer = runners(model, type_name, prompt, args)
    try:
        got = {r.name: outputs(r, prompt, args.new_tokens) for r in (moeinf, peer)}
        times = measure([moeinf, peer], prompt, args.new_tokens, args.repeats)
    finally:
        peer.close()
        moeinf.close()
    if type_name == REFERENCE:
        references.update(got)
    engines = {
        r.name: {"load_s": r.load_s, **summarise(times[r.name], len(prompt), args.new_tokens)} for r in (moeinf, peer)
    }
    ours, theirs = engines["moeinf"], engines["llama.cpp"]

    def ratio(key: str) -> float | None:
        return ours[key] / theirs[key] if ours[key] and theirs[key] else None

    row = {
        "type": type_name,
        "moeinf_dtype": spec.dtype,
        "moeinf_expert_dtype": spec.expert_dtype,
        "gguf_type": spec.gguf,
        "llamacpp_kv_type": spec.kv,
        "engines": engines,
        "ratios": {"prefill": ratio("prefill_tok_s"), "decode": ratio("decode_tok_s")},
        "agreement": agreement(got["moeinf"], got["llama.cpp"]),
    }
    if type_name != REFERENCE:  # each engine against its own f32 run
        row["against_f32"] = {name: compared(references[name], got[name]) for name in got}
    return row


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
        for name, own in row.get("against_f32", {}).items():
            print(
                f"{'':<6}{'':<11}{'':>29}   {name} vs its f32: {own['greedy_tokens_agreeing']}/"
                f"{own['greedy_tokens_compared']} tokens, logits within {own['logits_max_diff_rel']:.1e}"
            )
    print(
        f"(P={results['prompt_tokens']}, N={results['new_tokens']}, median of {results['repeats']}, {results['threads']} threads)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: moeinf's default model)")
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length P")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per full run N (>= 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds R; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="threads of both engines (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for llamacpp-cpu.json/.csv")
    args = parser.parse_args(argv)
    args.types = args.types.split(",")
    unknown = [t for t in args.types if t not in TYPES]
    if unknown:
        parser.error(f"expected --types of {', '.join(TYPES)}, found {', '.join(unknown)}")
    if len(set(args.types)) != len(args.types):
        parser.error(f"expected each of --types once, found {','.join(args.types)}")
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
    references: dict = {}  # each engine's f32 outputs, for the other types' against_f32
    rows = [run_type(model, type_name, prompt, args, references) for type_name in args.types]
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
