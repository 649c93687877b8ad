"""Multi-head latent attention, one sequence's attention step: expanding the latent cache into
per-head keys and values, against attending in latent space (weight absorption, models/mla.py).

Shapes are DeepSeek-V2-Lite's attention (16 heads, kv_lora 512, nope 128, rope 64, v 128) unless
given; weights random. For each cache length S and number of new tokens, both paths run on the same
inputs, their outputs are compared (relative error), and the median of --repeats timings is kept;
the ratio expanded / absorbed is what to read (the machine is shared; both run in the same loop).
`mla.attend_cached` picks by `absorbed_is_cheaper`; the last column says which it would pick.

    python -m bench.mla [--lengths 256,1024,4096] [--new 1,16,256] [--repeats 7] [--dtype float32]

Writes bench/results/mla-<device>.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from bench.machine import cpu_model, load_average
from moeinf.atomic_write import write_text_atomic
from moeinf.kernels.reference import rms_norm_reference
from moeinf.models import mla
from moeinf.models.attention import attend
from moeinf.models.spec import MLASpec, ModelSpec, RopeSpec

RESULTS = Path(__file__).resolve().parent / "results"


def lite_spec(heads: int, kv_lora: int, nope: int, rope: int, v_head: int) -> ModelSpec:
    shape = MLASpec(
        q_lora_rank=None, kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_head
    )
    return ModelSpec(
        architecture="DeepseekV2ForCausalLM", family="deepseek_v2", num_layers=1, hidden_size=2048, vocab_size=8,
        num_heads=heads, num_kv_heads=heads, head_dim=nope + rope, num_experts=1, top_k=1, expert_ffn=1,
        norm_eps=1e-6, rope=RopeSpec("default", 10000.0, rope), max_position=1 << 20, sliding_window=None,
        tie_word_embeddings=False, renormalize_topk=False, torch_dtype="float32", bos_token_id=None,
        eos_token_ids=(), mla=shape, attention_scale=(nope + rope) ** -0.5,
    )  # fmt: skip


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,1024,4096", help="cache lengths S (comma-separated)")
    parser.add_argument("--new", default="1,16,256", help="new tokens per step (comma-separated)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="16,512,128,64,128", help="heads,kv_lora,nope,rope,v_head")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/mla-<device>.json)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    heads, kv_lora, nope, rope, v_head = (int(x) for x in args.shape.split(","))
    spec = lite_spec(heads, kv_lora, nope, rope, v_head)
    torch.manual_seed(0)
    weights = mla.MLAWeights(
        kv_a=torch.empty(0),  # not used: the cache is built directly below
        kv_a_norm=torch.empty(0),
        kv_b=(torch.randn(heads * (nope + v_head), kv_lora) * kv_lora**-0.5).to(device, dtype),
    )
    lengths = [int(x) for x in args.lengths.split(",")]
    news = [int(x) for x in args.new.split(",")]
    rows = []
    for S, new in tqdm([(s, n) for s in lengths for n in news if n <= s], desc="mla cases", unit="case"):
        latent = rms_norm_reference(torch.randn(S, kv_lora), torch.ones(kv_lora), 1e-6)
        cached = torch.cat([latent, torch.randn(S, rope)], dim=-1)[None].to(device, dtype)  # [1, S, C + rope]
        q = torch.randn(new, heads, nope + rope).to(device, dtype)
        start = S - new

        def expanded():
            k, v = mla.expand(cached, weights, spec)
            return attend(q, k, v, start, None, spec.attention_scale)

        def absorbed():
            return mla.attend_latent(q, cached, weights, spec, start, None)

        reference, latent_out = expanded().float(), absorbed().float()
        rel = ((latent_out - reference).norm() / reference.norm()).item()
        t_expanded, t_absorbed = median_ms(expanded, args.repeats), median_ms(absorbed, args.repeats)
        rows.append({
            "S": S, "new": new, "expanded_ms": round(t_expanded, 3), "absorbed_ms": round(t_absorbed, 3),
            "speedup": round(t_expanded / t_absorbed, 2), "rel_err": float(f"{rel:.2e}"),
            "picks": "absorbed" if mla.absorbed_is_cheaper(new, spec) else "expanded",
        })  # fmt: skip
    print(f"{'S':>6} {'new':>5} {'expanded ms':>12} {'absorbed ms':>12} {'exp/abs':>8} {'rel err':>9}  picks")
    for r in rows:
        print(f"{r['S']:>6} {r['new']:>5} {r['expanded_ms']:>12.3f} {r['absorbed_ms']:>12.3f} "
              f"{r['speedup']:>7.2f}x {r['rel_err']:>9.1e}  {r['picks']}")  # fmt: skip
    label = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    result = {
        "benchmark": "bench/mla.py",
        "command": "python -m bench.mla " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": label,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "dtype": args.dtype,
        "shape": {"heads": heads, "kv_lora": kv_lora, "nope": nope, "rope": rope, "v_head": v_head},
        "rows": rows,
    }
    out = args.out or RESULTS / f"mla-{device.type}.json"
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
