"""Synthetic expert-routing workloads, for replaying policies at shapes no recorded trace covers.

The real traces in ../shared/traces are three Mixtral-8x7B sequences: enough to check a policy,
not to compare policies on a 128- or 256-expert model serving many requests. This generator
writes trace files (moeinf.runtime.traces format) with the three properties expert caching
depends on, each calibrated on data where there is data:

1. Task skew. A workload is many sequences drawn from a few tasks (text domains). Each task has,
   per layer, an expert popularity p[t, l] = Zipf(s) over a random permutation of the experts.
   The exponent s is fitted, by bisection on the generator itself, so that a task's aggregate
   routing (all tokens of many sequences, every top-k choice counted, as in the file) has the
   normalised entropy H / log E measured for that domain in ../shared/traces/domain-expert-
   counts.json. The file measures three layers (first, middle, last); exponents are fitted there
   and interpolated linearly over relative depth. Mixtral-shaped workloads (8 experts) take
   Mixtral's per-domain figures; fine-grained shapes (Qwen3-30B-A3B, DeepSeek-V3) take OLMoE's
   (64 experts, top-8: the fine-grained model measured), assuming normalised entropy carries
   over to 128 and 256 experts. The busiest-expert share is reported beside it as a check; it
   does not carry over between expert counts, so it is not a target.
2. Sequence skew. A sequence routes by its own popularity q[s, l] ~ Dirichlet(seq_alpha * E *
   p[t, l]): centred on its task's, with seq_alpha the per-expert concentration (the relative
   spread of an average expert's share across sequences is about 1 / sqrt(seq_alpha), whatever E is, which
   is how it transfers between shapes). This is what EAM matching can exploit.
3. In-sequence reuse. Each of a token's K experts at a layer is kept by the next token with
   probability `reuse`; the rest are drawn from q[s, l] without replacement (Gumbel top-k).

seq_alpha and reuse are fitted together on the real Mixtral traces (`python -m bench.synthetic
calibrate`): at Mixtral's shape and the real sequence lengths, they reproduce the traces' token-
to-token repeat rate (how often an expert a token used at a layer is used there by the next
token; 0.34-0.37 real, 0.25 for independent uniform routing) and their mean per-sequence, per-
layer normalised entropy (0.955-0.969). The defaults below are that fit's output. The optional
lookahead (the next layer's router applied early) keeps each true next-layer expert with
probability lookahead_accuracy and replaces the others by draws from the sequence's next-layer
popularity; 0.85 is an assumption (cross-layer gate predictors are reported in the 80-90% range
for Mixtral), not a fit.

Run:
  python -m bench.synthetic generate --model deepseek-v3 --sequences 24 --tokens 32 --out ds.npz
  python -m bench.synthetic calibrate     # re-fit seq_alpha and reuse on the real traces
  python -m bench.synthetic stats FILE.npz [FILE.npz ...]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache.eam import DECODE, PREFILL
from moeinf.runtime.replay.cost import MODELS
from moeinf.runtime.traces import NO_NEXT_LAYER, Trace, read_trace, write_trace

SHARED_TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
COUNTS_FILE = SHARED_TRACES / "domain-expert-counts.json"
REAL_TRACES = ("mixtral-8x7b-gsm8k.npz", "mixtral-8x7b-humaneval-raw.npz")
DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")

# `calibrate` output on the two real Mixtral traces (see the module docstring); rerun it to refit.
SEQ_ALPHA = 7.395
REUSE = 0.126
LOOKAHEAD_ACCURACY = 0.85

CALIBRATION_SEED = 1234  # common random numbers across bisection steps, so the fit is smooth


@dataclass(frozen=True)
class Workload:
    """Parameters of one synthetic workload."""

    model: str = "mixtral-8x7b"  # a name in moeinf.runtime.replay.cost.MODELS: sets L, E, K
    sequences: int = 64
    min_tokens: int = 32  # decode tokens per sequence, uniform in [min_tokens, max_tokens]
    max_tokens: int = 32
    prompt_tokens: int = 0  # prefill tokens per sequence (0: decode only, like the real traces)
    tasks: tuple[str, ...] = DOMAINS  # domains of domain-expert-counts.json; sequences pick uniformly
    seq_alpha: float = SEQ_ALPHA
    reuse: float = REUSE
    lookahead_accuracy: float | None = LOOKAHEAD_ACCURACY  # None: no lookahead array
    seed: int = 0

    def shape(self) -> tuple[int, int, int]:
        if self.model not in MODELS:
            raise ReplayConfigError(f"synthetic model: expected one of {', '.join(MODELS)}, found {self.model!r}")
        m = MODELS[self.model]
        return m.num_layers, m.num_experts, m.top_k


# ---------------------------------------------------------------------------------- targets


def normalised_entropy(counts: np.ndarray) -> np.ndarray:
    """counts: [..., E] -> [...] H(p) / log E of the normalised counts."""
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return h / np.log(counts.shape[-1])


def busiest_share(counts: np.ndarray) -> np.ndarray:
    """counts: [..., E] -> [...] the largest expert's share of the tokens."""
    return counts.max(axis=-1) / np.maximum(counts.sum(axis=-1), 1)


@dataclass(frozen=True)
class DomainTarget:
    depths: np.ndarray  # [3] relative depth of the measured layers, in [0, 1]
    entropy: np.ndarray  # [3] normalised entropy there
    busiest: np.ndarray  # [3] busiest-expert share there (reported, not fitted)


def domain_targets(num_experts: int, counts_file: Path = COUNTS_FILE) -> dict[str, DomainTarget]:
    """Per-domain skew of the measured model closest to `num_experts`: Mixtral for 8 experts,
    OLMoE (64, the fine-grained one) otherwise."""
    data = json.loads(Path(counts_file).read_text())
    family = "mixtral" if num_experts <= 8 else "olmoe"
    info = data["models"][family]
    depths = np.array(info["layers"], dtype=np.float64) / (info["num_layers"] - 1)
    targets = {}
    for domain, per_layer in data["counts"][family].items():
        counts = np.array(per_layer, dtype=np.float64)  # [3, E]
        targets[domain] = DomainTarget(depths, normalised_entropy(counts), busiest_share(counts))
    return targets


# ---------------------------------------------------------------------------------- the generator


def zipf_log_popularity(exponent: float, num_experts: int) -> np.ndarray:
    """[E] log p of Zipf(exponent) in rank order."""
    logp = -exponent * np.log(np.arange(1, num_experts + 1))
    return logp - np.logaddexp.reduce(logp)


def _sequence_log_popularity(logp: np.ndarray, seq_alpha: float, rng: np.random.Generator) -> np.ndarray:
    """logp: [..., E] task log popularity -> [..., E] a sequence's, ~ Dirichlet(seq_alpha * E * p)."""
    E = logp.shape[-1]
    g = rng.standard_gamma(seq_alpha * E * np.exp(logp))
    g = np.maximum(g, 1e-300)  # a zero draw is an expert the sequence never picks
    return np.log(g) - np.log(g.sum(axis=-1, keepdims=True))


def _route(logq: np.ndarray, prev: np.ndarray | None, reuse: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """One token's routing. logq: [..., E] log popularity; prev: [..., K] the previous token's
    experts (None at a sequence's first token). Returns [..., K] distinct experts: each of prev
    kept with probability `reuse`, the rest drawn without replacement by q (Gumbel top-k)."""
    scores = logq + rng.gumbel(size=logq.shape)
    if prev is not None:
        keep = rng.random(prev.shape) < reuse
        kept = np.where(keep, np.inf, np.take_along_axis(scores, prev, axis=-1))
        np.put_along_axis(scores, prev, kept, axis=-1)
    return np.argpartition(-scores, top_k - 1, axis=-1)[..., :top_k]


def _sample(
    logq: np.ndarray,
    lengths: np.ndarray,
    prompt_tokens: int,
    reuse: float,
    top_k: int,
    lookahead_accuracy: float | None,
    rng: np.random.Generator,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """logq: [M, L, E] each sequence's log popularity; lengths: [M] tokens of each (prompt
    included). Returns experts [M, T, L, K] and lookahead [M, T, L, K] or None, T = max(lengths);
    rows past a sequence's length are padding. Prompt tokens are routed independently (a prefill
    has no token-to-token carry-over)."""
    M, L, _ = logq.shape
    T = int(lengths.max())
    experts = np.empty((M, T, L, top_k), dtype=np.int64)
    lookahead = None if lookahead_accuracy is None else np.full((M, T, L, top_k), NO_NEXT_LAYER, dtype=np.int64)
    prev = None
    for n in tqdm(range(T), desc=progress, unit="tok", disable=progress is None):
        prev = experts[:, n] = _route(logq, None if n <= prompt_tokens else prev, reuse, top_k, rng)
        if lookahead is not None:
            lookahead[:, n, :-1] = _predict_next(logq[:, 1:], experts[:, n, 1:], lookahead_accuracy, rng)
    return experts, lookahead


def _layer_entropy(exponent: float, num_experts: int, top_k: int, seq_alpha: float, reuse: float) -> float:
    """Normalised entropy of one task's aggregate routing at one layer, for a Zipf exponent."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    M, T = 128, 32
    logp = np.broadcast_to(zipf_log_popularity(exponent, num_experts), (M, 1, num_experts))
    logq = _sequence_log_popularity(logp, seq_alpha, rng)
    ids, _ = _sample(logq, np.full(M, T), 0, reuse, top_k, None, rng)
    return float(normalised_entropy(np.bincount(ids.reshape(-1), minlength=num_experts).astype(np.float64)))


def fit_exponent(target_entropy: float, num_experts: int, top_k: int, seq_alpha: float, reuse: float) -> float:
    """The Zipf exponent whose aggregate routing has `target_entropy` (bisection; entropy falls
    as the exponent grows). Targets above what exponent 0 gives (sampling noise) fit to 0."""
    lo, hi = 0.0, 4.0
    if _layer_entropy(lo, num_experts, top_k, seq_alpha, reuse) <= target_entropy:
        return 0.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if _layer_entropy(mid, num_experts, top_k, seq_alpha, reuse) > target_entropy:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def task_exponents(workload: Workload) -> np.ndarray:
    """[T, L] fitted Zipf exponent of each task at each layer."""
    L, E, K = workload.shape()
    targets = domain_targets(E)
    unknown = [t for t in workload.tasks if t not in targets]
    if unknown:
        raise ReplayConfigError(f"synthetic tasks: expected domains among {', '.join(targets)}, found {unknown}")
    depth = np.arange(L) / max(L - 1, 1)
    out = np.empty((len(workload.tasks), L))
    for i, task in enumerate(workload.tasks):
        target = targets[task]
        fitted = [fit_exponent(h, E, K, workload.seq_alpha, workload.reuse) for h in target.entropy]
        out[i] = np.interp(depth, target.depths, fitted)
    return out


def generate(workload: Workload, progress: bool = False) -> Trace:
    """The workload's trace. Same Workload (seed included), same trace."""
    L, E, K = workload.shape()
    if workload.sequences < 1 or not 1 <= workload.min_tokens <= workload.max_tokens or workload.prompt_tokens < 0:
        raise ReplayConfigError(
            f"synthetic workload: expected sequences >= 1 and 1 <= min_tokens <= max_tokens, prompt_tokens >= 0, "
            f"found {workload.sequences}, {workload.min_tokens}, {workload.max_tokens}, {workload.prompt_tokens}"
        )
    exponents = task_exponents(workload)  # [T, L]
    rng = np.random.default_rng(workload.seed)
    num_tasks = len(workload.tasks)
    # task_logp: [T, L, E] Zipf by rank, then each (task, layer) ranks the experts its own way
    ranked = np.stack([np.stack([zipf_log_popularity(s, E) for s in row]) for row in exponents])
    perms = rng.permuted(np.broadcast_to(np.arange(E), (num_tasks, L, E)), axis=-1)
    task_logp = np.empty_like(ranked)
    np.put_along_axis(task_logp, perms, ranked, axis=-1)

    M, P = workload.sequences, workload.prompt_tokens
    task_of = rng.integers(num_tasks, size=M)
    lengths = P + rng.integers(workload.min_tokens, workload.max_tokens + 1, size=M)
    logq = _sequence_log_popularity(task_logp[task_of], workload.seq_alpha, rng)  # [M, L, E]
    progress_label = f"synthetic {workload.model}" if progress else None
    experts, lookahead = _sample(logq, lengths, P, workload.reuse, K, workload.lookahead_accuracy, rng, progress_label)
    weights = np.exp(np.take_along_axis(logq[:, None], experts, axis=-1))  # [M, T, L, K]
    weights /= weights.sum(axis=-1, keepdims=True)

    rows = [np.arange(int(n)) for n in lengths]
    phase = np.concatenate([np.where(r < P, PREFILL, DECODE) for r in rows]).astype(np.int8)
    seq_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def cut(a: np.ndarray) -> np.ndarray:
        """[M, T, ...] padded per sequence -> [N, ...] back to back."""
        return np.concatenate([a[i, : lengths[i]] for i in range(M)])

    meta = {
        "model": f"synthetic ({MODELS[workload.model].name} shape)",
        "num_layers": L,
        "num_experts": E,
        "top_k": K,
        "source": "bench/synthetic.py, calibrated on ../shared/traces (domain-expert-counts.json, Mixtral traces)",
        "workload": {**asdict(workload), "tasks": list(workload.tasks)},
        "sequences": [f"{workload.tasks[t]}:{i}" for i, t in enumerate(task_of)],
    }
    return Trace(
        experts=cut(experts).astype(np.int16),
        weights=cut(weights).astype(np.float16),
        seq_starts=seq_starts,
        phase=phase,
        meta=meta,
        lookahead=None if lookahead is None else cut(lookahead).astype(np.int16),
    )


def _predict_next(logq: np.ndarray, true: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """A lookahead of accuracy `accuracy`: logq [..., E] and true [..., K] the next layer's
    popularity and experts. Each true expert is kept with probability `accuracy`; the others are
    replaced by draws from logq among the experts not truly picked."""
    K = true.shape[-1]
    scores = logq + rng.gumbel(size=logq.shape)
    keep = rng.random(true.shape) < accuracy
    np.put_along_axis(scores, true, np.where(keep, np.inf, -np.inf), axis=-1)
    return np.argpartition(-scores, K - 1, axis=-1)[..., :K]


# ---------------------------------------------------------------------------------- statistics


def repeat_rate(trace: Trace) -> float:
    """How often an expert a token used at a layer is used at that layer by the sequence's next
    token (decode tokens only)."""
    hits = total = 0
    for s in range(trace.num_sequences):
        rows = trace.sequence(s)
        ids = trace.experts[rows][trace.phase[rows] == DECODE].astype(np.int64)  # [n, L, K]
        if len(ids) < 2:
            continue
        same = (ids[1:, :, :, None] == ids[:-1, :, None, :]).any(axis=-1)  # [n - 1, L, K]
        hits += int(same.sum())
        total += same.size
    return hits / total if total else 0.0


def sequence_entropy(trace: Trace) -> float:
    """Mean over sequences and layers of the normalised entropy of the sequence's routing."""
    return float(
        np.mean([normalised_entropy(trace.eam(s).astype(np.float64)).mean() for s in range(trace.num_sequences)])
    )


def task_skew(trace: Trace) -> dict[str, dict[str, list[float]]]:
    """Per task (from meta["sequences"] names 'task:i'): normalised entropy and busiest share of
    its aggregate routing at each layer."""
    names = trace.meta.get("sequences", [f"all:{s}" for s in range(trace.num_sequences)])
    by_task: dict[str, np.ndarray] = {}
    for s, name in enumerate(names):
        task = name.split(":")[0]
        by_task[task] = by_task.get(task, 0) + trace.eam(s).astype(np.float64)
    return {
        task: {"entropy": normalised_entropy(c).tolist(), "busiest": busiest_share(c).tolist()}
        for task, c in by_task.items()
    }


# ---------------------------------------------------------------------------------- calibration


def calibrate(traces: list[Trace], rounds: int = 3) -> dict[str, float]:
    """Fits seq_alpha and reuse at Mixtral's shape so that synthetic sequences of the real lengths
    have the real traces' repeat rate and mean per-sequence entropy (alternating bisections). The
    task skew behind them is the mean over Mixtral's domains, refitted for each candidate."""
    target_repeat = float(np.mean([repeat_rate(t) for t in traces]))
    target_entropy = float(np.mean([sequence_entropy(t) for t in traces]))
    lengths = np.array([int(t.seq_starts[s + 1] - t.seq_starts[s]) for t in traces for s in range(t.num_sequences)])
    m = MODELS["mixtral-8x7b"]
    L, E, K = m.num_layers, m.num_experts, m.top_k
    task_entropy = float(np.mean([t.entropy.mean() for t in domain_targets(E).values()]))
    copies = 16  # synthetic sequences per real one

    def measure(seq_alpha: float, reuse: float) -> tuple[float, float]:
        rng = np.random.default_rng(CALIBRATION_SEED)
        exponent = fit_exponent(task_entropy, E, K, seq_alpha, reuse)
        ranked = zipf_log_popularity(exponent, E)
        perms = rng.permuted(np.broadcast_to(np.arange(E), (L, E)), axis=-1)
        logp = np.empty((L, E))
        np.put_along_axis(logp, perms, np.broadcast_to(ranked, (L, E)), axis=-1)
        seq_lengths = np.repeat(lengths, copies)
        logq = _sequence_log_popularity(np.broadcast_to(logp, (len(seq_lengths), L, E)), seq_alpha, rng)
        ids, _ = _sample(logq, seq_lengths, 0, reuse, K, None, rng)
        rows = [ids[i, :n] for i, n in enumerate(seq_lengths)]
        trace = Trace(
            experts=np.concatenate(rows).astype(np.int16),
            weights=np.zeros((int(seq_lengths.sum()), L, K), np.float16),
            seq_starts=np.concatenate([[0], np.cumsum(seq_lengths)]).astype(np.int64),
            phase=np.full(int(seq_lengths.sum()), DECODE, np.int8),
            meta={"model": "calibration", "num_layers": L, "num_experts": E, "top_k": K, "source": "calibrate"},
        )
        return repeat_rate(trace), sequence_entropy(trace)

    def bisect(f, lo: float, hi: float, log: bool) -> float:
        """The root of f on [lo, hi], f increasing (geometric midpoints when log)."""
        for _ in range(12):
            mid = float(np.sqrt(lo * hi)) if log else (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return float(np.sqrt(lo * hi)) if log else (lo + hi) / 2

    seq_alpha, reuse = SEQ_ALPHA, REUSE
    for _ in tqdm(range(rounds), desc="calibrate", unit="round"):
        reuse = bisect(lambda r, a=seq_alpha: measure(a, r)[0] - target_repeat, 0.0, 0.9, log=False)
        seq_alpha = bisect(lambda a, r=reuse: measure(a, r)[1] - target_entropy, 0.05, 1000.0, log=True)
    achieved = measure(seq_alpha, reuse)
    return {
        "seq_alpha": round(seq_alpha, 3),
        "reuse": round(reuse, 3),
        "target_repeat_rate": target_repeat,
        "achieved_repeat_rate": achieved[0],
        "target_sequence_entropy": target_entropy,
        "achieved_sequence_entropy": achieved[1],
        "task_entropy": task_entropy,
    }


def stats(trace: Trace) -> dict:
    return {
        "model": trace.meta["model"],
        "shape": [trace.num_layers, trace.num_experts, trace.top_k],
        "sequences": trace.num_sequences,
        "tokens": trace.num_tokens,
        "repeat_rate": repeat_rate(trace),
        "sequence_entropy": sequence_entropy(trace),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic trace")
    gen.add_argument("--model", default="mixtral-8x7b", choices=sorted(MODELS))
    gen.add_argument("--sequences", type=int, default=64)
    gen.add_argument("--tokens", type=int, default=32, help="decode tokens per sequence (or --min/--max-tokens)")
    gen.add_argument("--min-tokens", type=int)
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--prompt-tokens", type=int, default=0)
    gen.add_argument("--tasks", default=",".join(DOMAINS))
    gen.add_argument("--seq-alpha", type=float, default=SEQ_ALPHA)
    gen.add_argument("--reuse", type=float, default=REUSE)
    gen.add_argument("--lookahead-accuracy", type=float, default=LOOKAHEAD_ACCURACY, help="negative: no lookahead")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True)
    sub.add_parser("calibrate", help="fit seq_alpha and reuse on the real Mixtral traces")
    st = sub.add_parser("stats", help="repeat rate, per-sequence entropy and per-task skew of traces")
    st.add_argument("files", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "generate":
        workload = Workload(
            model=args.model,
            sequences=args.sequences,
            min_tokens=args.min_tokens or args.tokens,
            max_tokens=args.max_tokens or args.tokens,
            prompt_tokens=args.prompt_tokens,
            tasks=tuple(args.tasks.split(",")),
            seq_alpha=args.seq_alpha,
            reuse=args.reuse,
            lookahead_accuracy=None if args.lookahead_accuracy < 0 else args.lookahead_accuracy,
            seed=args.seed,
        )
        trace = generate(workload, progress=True)
        write_trace(args.out, trace)
        print(json.dumps({"out": args.out, **stats(trace)}))
    elif args.command == "calibrate":
        print(json.dumps(calibrate([read_trace(SHARED_TRACES / name) for name in REAL_TRACES]), indent=1))
    else:
        for path in args.files:
            trace = read_trace(path)
            print(json.dumps({"file": path, **stats(trace), "task_skew": task_skew(trace)}))


if __name__ == "__main__":
    main()
