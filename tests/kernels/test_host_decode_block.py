"""The host decode block (kernels/host_decode_block.py) against the torch ops the executor runs
otherwise: the projections as torch's linear, the norms as rms_norm_reference, the routing as
softmax_topk_reference then the family's scaling and cast; float32 and bfloat16, one token and
several."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeinf.kernels import host_decode_block, host_norm
from moeinf.kernels.bf16_bits import as_numpy, as_tensor, empty_like_elements
from moeinf.kernels.reference import rms_norm_reference, softmax_topk_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms
from tests.kernels.test_host_dense import bf16_ulps

FP32 = TOLERANCE[torch.float32]


def weights(rows: int, cols: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=g) / cols**0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, N, K", [(1, 768, 512), (3, 37, 70), (32, 96, 64)])
def test_project_rounded_is_torch_linear(dtype, T, N, K):
    """float32: torch's linear to summation order; bfloat16: torch's rounded float32 product, the
    same bits but where the other order lands the float32 sum across a rounding boundary (an ulp,
    in well under 1% of the outputs)."""
    g = torch.Generator().manual_seed(N)
    x, w = torch.randn(T, K, generator=g).to(dtype), weights(N, K, dtype, g)
    out = empty_like_elements((T, N), dtype)
    host_decode_block.project_rounded(as_numpy(x), as_numpy(w), out)
    got, expected = as_tensor(out), F.linear(x, w)
    if dtype == torch.float32:
        assert rel_rms(got, expected) < FP32
    else:
        ulps = bf16_ulps(got, expected)
        assert ulps.max() <= 1 and (ulps > 0).float().mean() < 0.01


def torch_block(h, y, attn, attn_norm, w_qkv, w_o, ffn_norm, w_router, top_k, renormalize, scaling, weigh_dtype):
    """What the executor's torch ops compute between two attentions: (qkv, o, x, ids, weights)."""
    h.add_(y)
    qkv = F.linear(rms_norm_reference(h, attn_norm, 1e-5), w_qkv)
    o = F.linear(attn, w_o)
    h.add_(o)
    x = rms_norm_reference(h, ffn_norm, 1e-5)
    ids, routing = softmax_topk_reference(F.linear(x.to(w_router.dtype), w_router), top_k, renormalize)
    return qkv, o, x, ids, (routing * scaling).to(weigh_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, E, top_k, renormalize, scaling", [(1, 8, 2, True, 1.0), (5, 60, 4, False, 2.5)])
def test_block_calls_compute_what_the_torch_ops_do(dtype, T, E, top_k, renormalize, scaling):
    """norm_and_project then project_norm_route against torch_block, from the same residual stream;
    the router's weight in float32 for the second case (router_fp32 families) and its weights
    weighed in float32 (router_weights_fp32) where renormalize is off."""
    D, N, A = 64, 96, 48
    g = torch.Generator().manual_seed(E)
    h, y = torch.randn(T, D, generator=g).to(dtype), torch.randn(T, D, generator=g).to(dtype)
    attn = torch.randn(T, A, generator=g).to(dtype)
    attn_norm, ffn_norm = ((torch.rand(D, generator=g) + 0.5).to(dtype) for _ in range(2))
    w_qkv, w_o = weights(N, D, dtype, g), weights(D, A, dtype, g)
    w_router = weights(E, D, dtype if renormalize else torch.float32, g)
    weigh_dtype = dtype if renormalize else torch.float32
    expected_h = h.clone()
    expected = torch_block(
        expected_h, y, attn, attn_norm, w_qkv, w_o, ffn_norm, w_router, top_k, renormalize, scaling, weigh_dtype
    )
    arrays = {name: as_numpy(t) for name, t in dict(attn_norm=attn_norm, ffn_norm=ffn_norm, w_qkv=w_qkv).items()}
    residual, bf16, eps = as_numpy(h), dtype == torch.bfloat16, np.float32(1e-5)
    normed, qkv = empty_like_elements((T, D), dtype), empty_like_elements((T, N), dtype)
    host_decode_block.norm_and_project(
        residual, as_numpy(y), arrays["attn_norm"], eps, bf16, False, arrays["w_qkv"], normed, qkv
    )
    o, x = empty_like_elements((T, D), dtype), empty_like_elements((T, D), dtype)
    ids, routing = np.empty((T, top_k), np.int64), empty_like_elements((T, top_k), weigh_dtype)
    host_decode_block.project_norm_route(
        as_numpy(attn), as_numpy(w_o), residual, arrays["ffn_norm"], eps, bf16, False, as_numpy(w_router), renormalize,
        scaling, o, x, ids, routing,
    )  # fmt: skip
    got = (as_tensor(qkv), as_tensor(o), as_tensor(x), torch.from_numpy(ids), as_tensor(routing))
    assert torch.equal(got[3], expected[3])  # the same experts, in the same order
    if dtype == torch.float32:
        assert torch.allclose(h, expected_h, rtol=1e-6, atol=1e-6)
        for a, b in zip(got[:3] + got[4:], expected[:3] + expected[4:]):
            assert rel_rms(a, b) < FP32
    else:
        for a, b in zip((h,) + got[:3], (expected_h,) + expected[:3]):
            ulps = bf16_ulps(a, b)
            assert ulps.max() <= 1 and (ulps > 0).float().mean() < 0.02
        assert torch.allclose(got[4].float(), expected[4].float(), rtol=1e-2)


def test_router_picks_the_lower_id_at_a_tie_and_renormalises():
    """Two experts with equal logits: torch.topk's order (the lower id first), weights renormalised."""
    x = torch.ones(1, 4)
    w_router = torch.tensor([[0.0] * 4, [1.0] * 4, [1.0] * 4, [-1.0] * 4])  # logits 0, 4, 4, -4
    D, A = 4, 4
    residual = np.zeros((1, D), np.float32)
    o, normed = np.empty((1, D), np.float32), np.empty((1, D), np.float32)
    ids, routing = np.empty((1, 2), np.int64), np.empty((1, 2), np.float32)
    host_decode_block.project_norm_route(
        x.numpy(), np.eye(A, dtype=np.float32), residual, np.ones(D, np.float32), np.float32(0.0), False, False,
        w_router.numpy(), True, 1.0, o, normed, ids, routing,
    )  # fmt: skip
    expected_ids, expected_weights = softmax_topk_reference(F.linear(torch.from_numpy(normed), w_router), 2, True)
    assert ids.tolist() == expected_ids.tolist() == [[1, 2]]
    assert routing.tolist() == expected_weights.tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rows_is_the_reference_norm(dtype):
    """The decode block's first norm (host_norm.rms_norm_rows: no residual add) against
    rms_norm_reference: float32 to summation order, bfloat16 an ulp now and then."""
    g = torch.Generator().manual_seed(5)
    h, weight = torch.randn(3, 512, generator=g).to(dtype), (torch.rand(512, generator=g) + 0.5).to(dtype)
    out = empty_like_elements((3, 512), dtype)
    host_norm.rms_norm_rows(as_numpy(h), as_numpy(weight), np.float32(1e-5), dtype == torch.bfloat16, False, out)
    expected = rms_norm_reference(h, weight, 1e-5)
    if dtype == torch.float32:
        assert rel_rms(as_tensor(out), expected) < FP32
    else:
        ulps = bf16_ulps(as_tensor(out), expected)
        assert ulps.max() <= 1 and (ulps > 0).float().mean() < 0.01
