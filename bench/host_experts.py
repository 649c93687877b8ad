"""Host expert kernels at memory bandwidth: one routed expert (gate/up, activation, down, routing
weight) computed on the CPU for T tokens, in GB/s of expert weights read, against a stream read of a
buffer of the same size (summed as float32) and against torch's own CPU path (the reference for one token, the grouped
matmuls from two), all in the same run.

Shapes (hidden D x expert ffn F): Mixtral-8x7B 4096x14336, Qwen3-30B-A3B 2048x768, DeepSeek-V3
7168x2048 and the built-in default model 512x1792; T = 1, 4, 16, 32 tokens, all routed to the
expert; float32 and bfloat16 (host_experts), int8 (per channel) and int4 (groups of 32, symmetric,
float16 scales) computed from the quantized records (host_quant_experts, float32 tokens), their GB/s
counted in quantized bytes (weights and scales) and their torch path the reference's (each call
dequantizes the expert, then the float32 path). The weights are random. Decode reads every layer's
experts once per token, far more than any cache holds, so each shape is held in as many copies as
make --working-set-mb and every call reads the next copy: weights come from DRAM, as in a real run.
The stream read sums the same copies' bytes as float32 (torch's vectorised sum: a read at memory
speed). Rounds alternate host kernel, torch and stream; each figure is the median over --repeats
rounds.

    python -m bench.host_experts [--shapes mixtral,qwen3,deepseek-v3,default] [--tokens 1,4,16,32]
        [--dtypes float32,bfloat16,int8,int4] [--repeats 5] [--working-set-mb 256] [--json]
        [--out bench/results]

--json prints {"rows": [{"shape", "tokens", "dtype", "gbps", "stream_gbps", "torch_gbps"}, ...]};
the results file (<out>/host-experts-cpu.json) holds the same rows with the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import GB, MB, machine_info
from moeinf.atomic_write import write_text_atomic
from moeinf.kernels.host_experts import host_moe_experts
from moeinf.kernels.host_quant_experts import host_quant_moe_experts
from moeinf.kernels.ops import Kernels
from moeinf.kernels.quantize import QuantizedMatrix, quantize, quantized_moe_experts_reference

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (hidden D, expert ffn F)
    "mixtral": (4096, 14336),
    "qwen3": (2048, 768),
    "deepseek-v3": (7168, 2048),
    "default": (512, 1792),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32, "int4": torch.float32}
QUANTIZED = {"int8": dict(format="int8"), "int4": dict(format="int4", group_size=32)}  # int4: symmetric, float16 scales
TORCH = Kernels("torch")  # torch's CPU path: what the runtime ran before the host kernels


class Copies:
    """`count` copies of one random expert in slot buffers (w13 [S, 2F, D], w2 [S, D, F]; quantized
    by `quantized`'s options: QuantizedMatrix stacks of identical copies); next() gives the slot
    table routing expert 0 to the next copy, and stream() sums that copy's bytes."""

    def __init__(self, D: int, F: int, dtype: torch.dtype, count: int, quantized: dict | None = None):
        g = torch.Generator().manual_seed(0)
        if quantized is None:
            self.w13 = (torch.randn(count, 2 * F, D, generator=g) / D**0.5).to(dtype)
            self.w2 = (torch.randn(count, D, F, generator=g) / F**0.5).to(dtype)
            self.arrays = (self.w13, self.w2)
        else:  # one expert quantized, its arrays copied into every slot
            self.w13 = _copied(quantize(torch.randn(1, 2 * F, D, generator=g) / D**0.5, **quantized), count)
            self.w2 = _copied(quantize(torch.randn(1, D, F, generator=g) / F**0.5, **quantized), count)
            self.arrays = tuple(t for m in (self.w13, self.w2) for t in (m.q, m.scale, m.zero) if t is not None)
        self.count, self.turn = count, 0
        self.nbytes = sum(t[0].numel() * t.element_size() for t in self.arrays)  # one expert's bytes

    def next(self) -> torch.Tensor:
        self.turn = (self.turn + 1) % self.count
        return torch.tensor([self.turn])  # [E = 1]: the slot of expert 0

    def stream(self) -> None:
        slot = int(self.next())
        for array in self.arrays:
            array[slot].reshape(-1).view(torch.float32).sum()  # the bytes as float32: torch's fastest read of them


def _copied(m: QuantizedMatrix, count: int) -> QuantizedMatrix:
    """m [1, N, K] -> count copies of it, [count, N, K], each in its own memory."""

    def copies(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(count, *t.shape[1:]).contiguous()

    return QuantizedMatrix(m.format, copies(m.q), copies(m.scale), copies(m.zero), m.group_size)


def expert_nbytes(D: int, F: int, dtype_name: str) -> float:
    """About how many bytes one expert holds in dtype_name (to size the copies)."""
    if dtype_name == "int8":
        return 3 * D * F + 4 * (2 * F + D)
    if dtype_name == "int4":
        return 3 * D * F / 2 + 2 * 3 * D * F / QUANTIZED["int4"]["group_size"]
    return 3 * D * F * DTYPES[dtype_name].itemsize


def measure(name: str, dtype_name: str, tokens: int, repeats: int, working_set: float) -> dict:
    D, F = SHAPES[name]
    dtype, quantized = DTYPES[dtype_name], QUANTIZED.get(dtype_name)
    copies = Copies(D, F, dtype, max(2, math.ceil(working_set / expert_nbytes(D, F, dtype_name))), quantized)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    ids = torch.zeros(tokens, 1, dtype=torch.int64)  # every token routed to expert 0
    weights = torch.rand(tokens, 1, generator=g)
    if quantized is None:
        host, reference = host_moe_experts, TORCH.moe_experts
    else:  # torch's path: dequantize the expert (a float copy of it), then the float32 reference
        host, reference = host_quant_moe_experts, quantized_moe_experts_reference
    ways = {
        "host": lambda: host(x, ids, weights, copies.w13, copies.w2, copies.next()),
        "torch": lambda: reference(x, ids, weights, copies.w13, copies.w2, copies.next()),
        "stream": copies.stream,
    }
    seconds = {way: [] for way in ways}
    for way in ways.values():
        way()  # warm-up (the host kernel's first call may compile)
    for _ in range(repeats):
        for way, call in ways.items():
            start = time.perf_counter()
            call()
            seconds[way].append(time.perf_counter() - start)
    gbps = {way: copies.nbytes / statistics.median(s) / GB for way, s in seconds.items()}
    slot = copies.next()
    error = (
        host(x, ids, weights, copies.w13, copies.w2, slot) - reference(x, ids, weights, copies.w13, copies.w2, slot)
    ).float()
    return {
        "shape": f"{name} {D}x{F}",
        "tokens": tokens,
        "dtype": dtype_name,
        "gbps": gbps["host"],
        "stream_gbps": gbps["stream"],
        "torch_gbps": gbps["torch"],
        "expert_mb": copies.nbytes / MB,
        "copies": copies.count,
        "max_abs_diff_vs_torch": float(error.abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="1,4,16,32")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--working-set-mb", type=float, default=256.0, help="bytes of copies each shape cycles through")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    for value, known, what in ((shapes, SHAPES, "shape"), (dtypes, DTYPES, "dtype")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"--{what}s: expected names among {', '.join(known)}, found {', '.join(unknown)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    cases = [(s, d, t) for s in shapes for d in dtypes for t in tokens]
    rows = []
    for shape, dtype, count in tqdm(cases, desc="host experts", unit="case", file=sys.stderr):
        rows.append(measure(shape, dtype, count, args.repeats, args.working_set_mb * MB))
    if args.json:
        keys = ("shape", "tokens", "dtype", "gbps", "stream_gbps", "torch_gbps")
        print(json.dumps({"rows": [{k: r[k] for k in keys} for r in rows]}))
    else:
        print(
            f"{'shape':24s} {'T':>3s} {'dtype':9s} {'host GB/s':>9s} {'stream':>7s} {'torch':>7s} {'/stream':>7s} {'/torch':>7s}"
        )
        for r in rows:
            print(
                f"{r['shape']:24s} {r['tokens']:3d} {r['dtype']:9s} {r['gbps']:9.1f} {r['stream_gbps']:7.1f} "
                f"{r['torch_gbps']:7.1f} {r['gbps'] / r['stream_gbps']:7.2f} {r['gbps'] / r['torch_gbps']:7.2f}"
            )
    results = {
        "benchmark": "host-experts-cpu",
        "command": "python -m bench.host_experts " + " ".join(sys.argv[1:] if argv is None else argv),
        "method": __doc__.split("\n\n")[1],
        "machine": machine_info(),
        "rows": rows,
    }
    path = args.out / "host-experts-cpu.json"
    write_text_atomic(path, json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
