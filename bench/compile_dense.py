"""One float32 decode layer's dense side on the CPU: torch eager, torch.compile, the host kernels
and the host decode block.

Run:  python -m bench.compile_dense [--position 160] [--repeats 300] [--out bench/results]

The block is what the executor runs between two MoE layers for one decode token of the default
model's shape (hidden 512, 8 query heads and 2 KV heads of 64, a cache of 256 positions with
`--position` of them filled): RMSNorm, the fused qkv projection, rope on q and k, the KV write,
attention, the o projection, the residual add and the next RMSNorm. Four ways:
  eager     the torch references the executor falls back to (kernels="torch")
  compiled  the same function through torch.compile (inductor; dynamic=False, so each new cache
            length compiles again: "recompile_s" times one)
  host      what the executor runs on the CPU op by op: F.linear for the projections, host_attention's
            and host_norm's compiled calls for the rest (kernels/host_attention.py, host_norm.py)
  block     what it runs for decode steps of a model the host decode block takes (the default
            model): the same block as one compiled call of host_decode_block's pieces (its
            projections, host_attention.attend_rows, host_norm.add_rms_norm_rows), as decode_layers
            runs them inside a layer (which adds the router and the experts)
Each is timed as the median of --repeats calls after a warm-up, all four in alternating rounds;
compile_s is the first compiled call (the compile itself), cold: inductor's cache in a fresh
temporary folder (a warm cache from an earlier run cuts it several-fold). Outputs are compared with eager's
(max relative difference). Results: <out>/compile-dense-cpu.json, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from bench.common import machine_info
from moeinf.atomic_write import write_text_atomic
from moeinf.kernels.host_attention import attend_decode, attend_rows
from moeinf.kernels.host_decode_block import project_rounded
from moeinf.kernels.host_norm import add_rms_norm, add_rms_norm_rows
from moeinf.kernels.numba_cache import CALLS_PARALLEL
from moeinf.kernels.reference import rms_norm_reference
from moeinf.models.attention import attend
from moeinf.models.rope import apply_rope

D, H, HKV, DH, CAPACITY, EPS = 512, 8, 2, 64, 256, 1e-5


class Layer:
    """Random weights of one layer and its KV cache (k, v: [Hkv, C, Dh])."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.qkv = torch.randn((H + 2 * HKV) * DH, D, generator=g) * D**-0.5  # [q + 2 kv, D]
        self.o = torch.randn(D, H * DH, generator=g) * (H * DH) ** -0.5  # [D, q]
        self.norm = torch.rand(D, generator=g) + 0.5  # [D]
        self.k = torch.randn(HKV, CAPACITY, DH, generator=g)
        self.v = torch.randn(HKV, CAPACITY, DH, generator=g)


def eager(layer: Layer, h: torch.Tensor, x: torch.Tensor, cos, sin, position: int):
    """h: [1, D] residual, x: [1, D] its norm -> (new residual, its norm): the torch path."""
    q, k, v = F.linear(x, layer.qkv).split([H * DH, HKV * DH, HKV * DH], dim=-1)
    q, k = apply_rope(q.view(1, H, DH), cos, sin), apply_rope(k.view(1, HKV, DH), cos, sin)
    layer.k[:, position : position + 1] = k.transpose(0, 1)
    layer.v[:, position : position + 1] = v.view(1, HKV, DH).transpose(0, 1)
    attended = attend(q, layer.k[:, : position + 1], layer.v[:, : position + 1], position, None)
    h = h + F.linear(attended, layer.o)
    return h, rms_norm_reference(h, layer.norm, EPS)


def host(layer: Layer, h: torch.Tensor, x: torch.Tensor, cos, sin, position: int):
    """The same through the host kernels, as the executor runs a float32 decode step."""
    qkv = F.linear(x, layer.qkv)
    attended = attend_decode(qkv, cos, sin, layer.k, layer.v, position, None, None, H, HKV)
    h = h.clone()  # the executor adds into its residual stream in place; keep the input for the next call
    return h, add_rms_norm(h, F.linear(attended, layer.o), layer.norm, EPS)


@njit(cache=True, parallel=CALLS_PARALLEL)
def _block(h, x, w_qkv, w_o, norm, k_cache, v_cache, cos, sin, position, eps, out):
    """The block in one call of host_decode_block's pieces: h [1, D] += attention's projection;
    out [1, D] its norm."""
    qkv = np.empty((1, w_qkv.shape[0]), np.float32)
    project_rounded(x, w_qkv, qkv)
    attended = np.empty((1, H * DH), np.float32)
    attend_rows(qkv, cos, sin, k_cache, v_cache, position, 0, np.float32(DH**-0.5), H, HKV, DH, False, attended)
    o = np.empty((1, D), np.float32)
    project_rounded(attended, w_o, o)
    add_rms_norm_rows(h, o, norm, eps, False, False, out)


def block(layer: Layer, h: torch.Tensor, x: torch.Tensor, cos, sin, position: int):
    """The same through the host decode block's pieces in one call."""
    h, out = h.clone(), torch.empty_like(h)
    _block(
        h.numpy(), x.numpy(), layer.qkv.numpy(), layer.o.numpy(), layer.norm.numpy(), layer.k.numpy(),
        layer.v.numpy(), cos.numpy(), sin.numpy(), position, np.float32(EPS), out.numpy(),
    )  # fmt: skip
    return h, out


def timed(fn, repeats: int) -> float:
    """Median seconds of one call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--position", type=int, default=160, help="cached positions before the new token")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per way and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians of the rounds' medians")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not 0 <= args.position < CAPACITY - 1:
        parser.error(f"expected 0 <= --position < {CAPACITY - 1}")
    layer = Layer()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, D, generator=g)
    x = rms_norm_reference(h, layer.norm, EPS)
    angles = torch.randn(1, DH // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    p = args.position
    with torch.inference_mode(), tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled before
        compiled_fn = torch.compile(eager, dynamic=False)
        start = time.perf_counter()
        compiled_fn(layer, h, x, cos, sin, p)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled_fn(layer, h, x, cos, sin, p + 1)
        recompile_s = time.perf_counter() - start
        ways = {
            "eager": lambda: eager(layer, h, x, cos, sin, p),
            "compiled": lambda: compiled_fn(layer, h, x, cos, sin, p),
            "host": lambda: host(layer, h, x, cos, sin, p),
            "block": lambda: block(layer, h, x, cos, sin, p),
        }
        reference = ways["eager"]()[1]
        diffs = {name: ((fn()[1] - reference).abs().max() / reference.abs().max()).item() for name, fn in ways.items()}
        for fn in ways.values():
            fn()  # warm-up
        rounds = {name: [] for name in ways}
        for r in range(args.rounds):
            for name in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                rounds[name].append(timed(ways[name], args.repeats))
    results = {
        "benchmark": "compile-dense-cpu",
        "machine": machine_info(),
        "shape": {"hidden": D, "heads": H, "kv_heads": HKV, "head_dim": DH, "position": p},
        "compile_s": compile_s,
        "recompile_s": recompile_s,
        "us_per_call": {name: statistics.median(v) * 1e6 for name, v in rounds.items()},
        "max_rel_diff_vs_eager": diffs,
    }
    for name, us in results["us_per_call"].items():
        print(f"{name:>9}: {us:8.1f} us a layer   (max rel diff vs eager {diffs[name]:.1e})")
    print(f"torch.compile: {compile_s:.1f} s to compile one layer, {recompile_s:.1f} s again for the next position")
    out = args.out / "compile-dense-cpu.json"
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
