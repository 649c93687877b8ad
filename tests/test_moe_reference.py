"""The expert op against a per-token loop that reads experts by id, not through slots."""

import pytest
import torch
import torch.nn.functional as F

from moeinf.kernels import ops


def per_token_moe(x, ids, weights, gate, up, down):
    # gate, up: [E, F, D]; down: [E, D, F]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            y = F.linear(F.silu(F.linear(x[t], gate[e])) * F.linear(x[t], up[e]), down[e])
            out[t] += weights[t, j] * y
    return out


@pytest.mark.parametrize(
    "T, E, K",
    [
        (1, 4, 2),  # one decode token
        (13, 5, 2),  # a prime number of experts, some with no tokens
        (9, 3, 3),  # top-k = E: every expert gets every token
    ],
)
def test_moe_experts_matches_per_token_loop_through_a_permuted_slot_table(T, E, K):
    g = torch.Generator().manual_seed(T * 100 + E)
    D, FF, S = 16, 24, E + 3  # more slots than experts, as in a pool shared by layers
    x = torch.randn(T, D, generator=g)
    gate, up = torch.randn(E, FF, D, generator=g), torch.randn(E, FF, D, generator=g)
    down = torch.randn(E, D, FF, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    slots = torch.randperm(S, generator=g)[:E]  # expert e lives in slot slots[e]
    w13 = torch.full((S, 2 * FF, D), float("nan"))  # unused slots poisoned: reading one shows
    w2 = torch.full((S, D, FF), float("nan"))
    w13[slots] = torch.cat([gate, up], dim=1)
    w2[slots] = down
    got = ops.moe_experts(x, ids, weights, w13, w2, slots)
    torch.testing.assert_close(got, per_token_moe(x, ids, weights, gate, up, down), rtol=1e-5, atol=1e-5)


def test_all_tokens_to_one_expert():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    w13, w2 = torch.randn(2, 10, 8, generator=g), torch.randn(2, 8, 5, generator=g)
    ids = torch.ones(6, 1, dtype=torch.int64)
    got = ops.moe_experts(x, ids, torch.ones(6, 1), w13, w2, torch.tensor([0, 1]))
    expected = F.linear(F.silu(F.linear(x, w13[1, :5])) * F.linear(x, w13[1, 5:]), w2[1])
    torch.testing.assert_close(got, expected)
