"""`moeinf run ...` (the standalone run script), `moeinf serve ...` (HTTP) and `moeinf trace ...`. argparse
lives only here."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import resource
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from moeinf.errors import MoeinfError, RequestError
from moeinf.kernels.ops import KERNEL_CHOICES
from moeinf.loaders.default_model import ensure_default_model
from moeinf.loaders.expert_format import EXPERT_DTYPE_CHOICES
from moeinf.runtime.cache.counters import COUNTERS
from moeinf.runtime.cache.placement import HOST_COMPUTE_CHOICES
from moeinf.runtime.cache.registry import DEFAULT_POLICY, POLICIES
from moeinf.runtime.engine import LLM
from moeinf.runtime.replay.cost import traced_model_cost
from moeinf.runtime.sampling import SamplingParams
from moeinf.runtime.setup import resolve_dtype
from moeinf.runtime.traces import TraceBuilder, write_trace
from moeinf.serve.server import Server, bind_port

DEFAULT_PROMPT = "The expert said"
CUDA = torch.device("cuda")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise RequestError(f"--prompt-ids: expected comma-separated token ids such as 1,2,3; found {text!r}") from None


def llm_from_args(args: argparse.Namespace) -> LLM:
    """The LLM that add_llm_arguments' options describe."""
    return LLM(
        args.model or ensure_default_model(),
        device=args.device,
        dtype=args.dtype,
        expert_budget=parse_budget_arg(args.budget),
        host_budget=parse_budget_arg(args.host_budget),
        offload_dir=args.offload_dir,
        policy=args.policy,
        host_compute=args.host_compute,
        kernels=args.kernels,
        max_batch_tokens=getattr(args, "max_batch_tokens", None),
        expert_dtype=args.expert_dtype,
    )


def cmd_run(args: argparse.Namespace) -> int:
    params = SamplingParams(  # checked before the model loads
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    prompt = parse_token_ids(args.prompt_ids) if args.prompt_ids else args.prompt
    llm = llm_from_args(args)
    try:
        (out,) = llm.generate([prompt], params)
        stats = llm.stats()
    finally:
        llm.close()
    if out.text is None:  # a checkpoint without tokenizer.json: show ids
        print(f"prompt ids: {out.prompt_token_ids}\ngenerated ids: {out.token_ids}")
    elif args.prompt_ids:  # the given ids, as text
        print(llm.codec.decode(out.prompt_token_ids) + out.text)
    else:
        print(args.prompt + out.text)
    print("---")
    prefill_rate = stats["prefill_tokens"] / stats["prefill_s"]
    decode_rate = stats["decode_tokens"] / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    print(
        f"model: {llm.checkpoint.path} ({llm.spec.architecture}, {llm.dtype}, experts {llm.expert_format.name}, "
        f"{llm.device})\n"
        f"prefill: {stats['prefill_tokens']} tokens in {stats['prefill_s']:.3f} s ({prefill_rate:.1f} tokens/s)\n"
        f"decode: {stats['decode_tokens']} tokens in {stats['decode_s']:.3f} s ({decode_rate:.1f} tokens/s), "
        f"finished by {out.finish_reason}\n"
        f"{traffic_summary(stats)}\n"
        f"peak memory: {peak_memory_mib(llm.device):.0f} MiB"
    )
    return 0


def traffic_summary(stats: dict[str, float]) -> str:
    """The experts resident now, then every expert-traffic counter (runtime/cache/counters.py)
    that is not zero, in their order: counts by name, bytes in MiB, seconds to the millisecond."""
    parts = [f"{stats['resident_experts']} resident"]
    for name in COUNTERS:
        value = stats.get(name, 0)
        if not value:
            continue
        if name.startswith("bytes_"):  # bytes_from_disk -> "1.5 MiB from disk"
            parts.append(f"{value / 2**20:.1f} MiB {name.removeprefix('bytes_').replace('_', ' ')}")
        elif name.endswith("_s"):  # stall_s -> "0.012 s stall"
            parts.append(f"{value:.3f} s {name.removesuffix('_s').replace('_', ' ')}")
        else:
            parts.append(f"{value} {name.replace('_', ' ')}")
    return "experts: " + ", ".join(parts)


def parse_budget_arg(text: str | None) -> int | float | str | None:
    """'0.25' -> fraction, '16' -> slot count, anything else ('2GiB', '25%') as written."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: one per line, or JSON lines each with a "prompt" string."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise RequestError(f"--prompts: expected a readable text file, found {e}") from None
    if not lines:
        raise RequestError(f"--prompts: expected at least one prompt in {path}, found an empty file")
    if not lines[0].lstrip().startswith("{"):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            prompt = None
        if not isinstance(prompt, str):
            raise RequestError(f'{path}:{number}: expected a JSON object with a "prompt" string, found {line[:80]!r}')
        prompts.append(prompt)
    return prompts


def cmd_trace(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    llm = LLM(args.model or ensure_default_model(), device=args.device, dtype=args.dtype)
    spec = llm.spec
    builder = TraceBuilder(
        spec.num_moe_layers,
        spec.num_experts,
        spec.top_k,
        model=str(llm.checkpoint.path.name),
        source=f"moeinf trace --prompts {Path(args.prompts).name}",
        # the bytes a decode token reads in the dtype moeinf serves the checkpoint in on CUDA
        cost=traced_model_cost(llm.spec, llm.executor.dense, resolve_dtype("auto", spec.torch_dtype, CUDA).itemsize),
    )
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    batches = range(0, len(prompts), args.batch_size)
    for start in tqdm(batches, desc="tracing", unit="batch"):
        llm.generate(prompts[start : start + args.batch_size], params, trace=builder)
    write_trace(args.out, builder.build())
    print(f"wrote {args.out}: {len(prompts)} sequences, {builder.num_tokens} tokens, {spec.num_moe_layers} MoE layers")
    llm.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    sock = bind_port(args.host, args.port)  # before the model loads: a busy port fails at once
    try:
        llm = llm_from_args(args)
    except BaseException:
        sock.close()
        raise
    names = args.served_model_name or [llm.checkpoint.path.name]
    server = Server(llm, sock, names, args.max_batch_prompts, log_requests=not args.quiet)
    print(
        f"moeinf serve: {names[0]} on {server.url} (up to {server.engine.max_running} requests a step; "
        "POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, /stats)",
        flush=True,
    )
    # uvicorn stops on SIGINT / SIGTERM once the open requests are answered, then raises the signal
    # again with the handlers it found: SIGTERM's is made a no-op, so that the exit is a clean 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        print("moeinf serve: stopping", flush=True)
        llm.close()  # the engine loop answers what it still holds first
    return 0


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which model to load and how: llm_from_args reads them."""
    parser.add_argument("--model", help="Hugging Face checkpoint folder (default: the built-in default model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument(
        "--expert-dtype",
        default="auto",
        choices=EXPERT_DTYPE_CHOICES,
        help="routed experts' format: auto (the checkpoint's own, else --dtype), or int8 / int4[-g64|-g128] "
        "(round to nearest when the store is built)",
    )
    parser.add_argument(
        "--budget", help="device expert budget: fraction of expert bytes (0.25), size (2GiB, 25%%) or slot count (16)"
    )
    parser.add_argument(
        "--host-budget",
        default="auto",
        help="host-memory expert cache in front of the disk store (auto: half the free memory on CUDA, none on the CPU)",
    )
    parser.add_argument("--offload-dir", help="folder of the packed expert store (default: under the cache dir)")
    parser.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES), help="expert eviction policy")
    parser.add_argument(
        "--host-compute",
        default="auto",
        choices=HOST_COMPUTE_CHOICES,
        help="compute a missing expert on the host from the host tier instead of fetching it (needs --host-budget)",
    )
    parser.add_argument(
        "--kernels",
        default="auto",
        choices=KERNEL_CHOICES,
        help="auto: Triton kernels on CUDA, torch on the CPU; torch: torch everywhere (a baseline on CUDA)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeinf", description="Serve Mixture-of-Experts models.")
    parser.add_argument("--version", action="version", version=f"moeinf {importlib.metadata.version('moeinf')}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate text from one prompt and print tokens/s")
    add_llm_arguments(run)
    prompt = run.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=DEFAULT_PROMPT, help="text (needs the checkpoint's tokenizer.json)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, for checkpoints without a tokenizer")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.set_defaults(handler=cmd_run)

    serve = sub.add_parser("serve", help="answer OpenAI-style completion requests over HTTP")
    add_llm_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    serve.add_argument(
        "--served-model-name",
        "--model-name",
        nargs="+",
        help="the names requests may call the model (the first is the one answers carry; default: its folder's)",
    )
    serve.add_argument(
        "--max-batch-prompts",
        type=int,
        default=None,
        help="requests one decode step may carry (default: as many as the expert budget serves, at most 8)",
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        default=256,
        help="tokens one forward may carry: a long prompt is prefilled in chunks of it between decode steps",
    )
    serve.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    serve.set_defaults(handler=cmd_serve)

    trace = sub.add_parser("trace", help="record expert routing traces (.npz) from real runs")
    trace.add_argument("--model", help="Hugging Face checkpoint folder (default: the built-in default model)")
    trace.add_argument("--prompts", required=True, help='text file: one prompt per line, or JSON lines with "prompt"')
    trace.add_argument("--out", required=True, help="trace file to write (.npz)")
    trace.add_argument("--max-new-tokens", type=int, default=64)
    trace.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    trace.add_argument("--temperature", type=float, default=0.0)
    trace.add_argument("--seed", type=int, default=None)
    trace.add_argument("--device", default="cpu")
    trace.add_argument("--dtype", default="auto")
    trace.set_defaults(handler=cmd_trace)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MoeinfError as e:
        print(f"moeinf: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
