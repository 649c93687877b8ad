"""Scorer microbenchmark: the Numba scorer against its numpy reference, per call, in one run.

Run:  .venv/bin/python -m pytest bench/scorer.py --benchmark-only -q
      (add --benchmark-columns=min,median,mean,rounds or --benchmark-json=FILE as wanted)

The default test run (testpaths = tests) never collects this file; it runs only when named.

Shapes (layers x experts): 32x8 (Mixtral-8x7B), 48x128 (Qwen3-30B-A3B), 58x256 (DeepSeek-V3's
MoE layers). pred [L, E] is random with rows normalised, as the policy keeps it.
  prefetch: prefetch_order over every layer ahead of the middle one (horizon L - 1), n = 16: the
    most the scorer is asked; the policy's default (horizon 1, n = 1) reads one row.
  evict: eviction_order of the single lowest-priority key among C = L * E / 4 candidates (a pool
    holding a quarter of the experts, every slot evictable: the most a victim call sees there).
  policy victim / prefetch: ActivationAwarePolicy.victim(list of C (layer, expert) tuples) and
    .prefetch(layer) at its defaults: what the cache controller pays per call, with the Python
    around the scorer (turning the controller's tuples into an array, keys back into tuples).
Every figure is a per-call time; the numba and numpy rows of a group are the same call with the
same result (asserted). Compile time is excluded (one call before timing; cache=True keeps the
compiled code between runs).
"""

from __future__ import annotations

import numpy as np
import pytest

from moeinf.runtime.activation_policy import ActivationAwarePolicy
from moeinf.runtime.scorer import eviction_order, eviction_order_ref, prefetch_order, prefetch_order_ref

SHAPES = [(32, 8), (48, 128), (58, 256)]
EPS = 1e-3
PREFETCH_N = 16


@pytest.fixture(params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}", scope="module")
def case(request):
    L, E = request.param
    rng = np.random.default_rng(0)
    pred = rng.random((L, E))
    pred /= pred.sum(axis=1, keepdims=True)  # pred: [L, E]
    flat = rng.permutation(L * E)[: L * E // 4]
    keys = np.stack([flat // E, flat % E], axis=1).astype(np.int64)  # keys: [C, 2]
    return L, E, pred, keys


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_prefetch(benchmark, case, impl):
    L, E, pred, _ = case
    fn = prefetch_order if impl == "numba" else prefetch_order_ref
    args = (pred, L // 2, L - 1, PREFETCH_N)
    assert np.array_equal(fn(*args), prefetch_order_ref(*args))
    benchmark.group = f"prefetch {L}x{E}"
    benchmark(fn, *args)


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_evict(benchmark, case, impl):
    L, E, pred, keys = case
    fn = eviction_order if impl == "numba" else eviction_order_ref
    args = (pred, keys, L // 2, 1, EPS)
    assert np.array_equal(fn(*args), eviction_order_ref(*args))
    benchmark.group = f"evict {L}x{E}"
    benchmark(fn, *args)


@pytest.mark.parametrize("call", ["victim", "prefetch"])
def test_policy(benchmark, case, call):
    L, E, pred, keys = case
    policy = ActivationAwarePolicy(L, E)
    policy.begin_batch()
    policy.observe(0, [1] * E)
    policy.pred[:] = pred
    candidates = [tuple(k) for k in keys.tolist()]
    benchmark.group = f"policy {L}x{E}"
    if call == "victim":
        benchmark(policy.victim, candidates)
    else:
        benchmark(policy.prefetch, L // 2)
