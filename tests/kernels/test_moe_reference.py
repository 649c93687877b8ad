"""The expert op against a per-token loop that reads experts by id, not through slots, and against
transformers' GPT-OSS experts (biases, clamped SwiGLU)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from moeinf.kernels.expert_activation import ExpertActivation
from moeinf.kernels.ops import AUTO


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
    got = AUTO.moe_experts(x, ids, weights, w13, w2, slots)
    torch.testing.assert_close(got, per_token_moe(x, ids, weights, gate, up, down), rtol=1e-5, atol=1e-5)


def test_all_tokens_to_one_expert():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    w13, w2 = torch.randn(2, 10, 8, generator=g), torch.randn(2, 8, 5, generator=g)
    ids = torch.ones(6, 1, dtype=torch.int64)
    got = AUTO.moe_experts(x, ids, torch.ones(6, 1), w13, w2, torch.tensor([0, 1]))
    expected = F.linear(F.silu(F.linear(x, w13[1, :5])) * F.linear(x, w13[1, 5:]), w2[1])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("T, E, K", [(13, 5, 2), (1, 4, 4)], ids=["13 tokens", "one token, top-k = E"])
def test_biased_clamped_swiglu_matches_transformers_gpt_oss_experts(T, E, K):
    g = torch.Generator().manual_seed(T * 10 + E)
    D, FF, S = 16, 12, E + 2
    config = GptOssConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K)
    experts = GptOssExperts(config)
    with torch.no_grad():
        # pre-activations of std about 5: the clamp at swiglu_limit = 7 binds for some elements
        experts.gate_up_proj.copy_(4 * torch.randn(E, D, 2 * FF, generator=g) / D**0.5)
        experts.gate_up_proj_bias.copy_(2 * torch.randn(E, 2 * FF, generator=g))
        experts.down_proj.copy_(torch.randn(E, FF, D, generator=g) / FF**0.5)
        experts.down_proj_bias.copy_(torch.randn(E, D, generator=g))
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    with torch.no_grad():
        expected = experts(x, router_indices=ids, routing_weights=weights)

    # transformers interleaves gate and up on the last dim (gate = [..., ::2], up = [..., 1::2]);
    # w13 stacks gate rows then up rows. Unused slots are NaN, and the biases are strided views.
    slots = torch.randperm(S, generator=g)[:E]  # expert e lives in slot slots[e]
    gate_up, gate_up_bias = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach()
    w13 = torch.full((S, 2 * FF, D), float("nan"))
    w2 = torch.full((S, D, FF), float("nan"))
    b13 = torch.full((S, 2 * FF + 3), float("nan"))[:, : 2 * FF]  # [S, 2F], slot stride 2F + 3
    b2 = torch.full((S, D, 2), float("nan"))[:, :, 0]  # [S, D], column stride 2
    w13[slots] = torch.cat([gate_up[:, :, ::2].transpose(1, 2), gate_up[:, :, 1::2].transpose(1, 2)], dim=1)
    b13[slots] = torch.cat([gate_up_bias[:, ::2], gate_up_bias[:, 1::2]], dim=1)
    w2[slots] = experts.down_proj.detach().transpose(1, 2)
    b2[slots] = experts.down_proj_bias.detach()
    activation = ExpertActivation("clamped_swiglu", alpha=config.swiglu_alpha, limit=config.swiglu_limit)

    pre = torch.einsum("td,tkfd->tkf", x, w13[slots[ids]]) + b13[slots[ids]]  # [T, K, 2F]
    gate, up = pre[..., :FF], pre[..., FF:]
    assert (gate > activation.limit).any() and (up.abs() > activation.limit).any(), "the clamp never binds"

    # on the CPU the op is moe_experts_reference
    got = AUTO.moe_experts(x, ids, weights, w13, w2, slots, b13=b13, b2=b2, activation=activation)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_reference_rejects_one_bias_without_the_other():
    x, ids, weights = torch.randn(3, 8), torch.ones(3, 1, dtype=torch.int64), torch.ones(3, 1)
    w13, w2, slots = torch.randn(2, 10, 8), torch.randn(2, 8, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="b13 and b2"):
        AUTO.moe_experts(x, ids, weights, w13, w2, slots, b2=torch.zeros(2, 8))
