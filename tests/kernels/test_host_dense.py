"""The host kernels of a decode step's dense side against their torch references: the residual add
with its RMSNorm (host_norm) and rope + cache write + attention (host_attention), float32 and
bfloat16, with the shapes the families bring (GQA, partial rotary, a sliding window, steps of
several tokens)."""

import pytest
import torch

from moeinf.kernels.host_attention import attend_decode
from moeinf.kernels.host_norm import add_rms_norm
from moeinf.kernels.host_norm import applies as host_norm_applies
from moeinf.kernels.ops import AUTO, Kernels
from moeinf.kernels.reference import rms_norm_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms
from moeinf.models.attention import attend
from moeinf.models.rope import apply_rope

FP32, BF16 = TOLERANCE[torch.float32], TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("T, D", [(1, 512), (5, 37), (32, 64)])
def test_add_rms_norm_adds_in_place_and_matches_the_reference(T, D):
    g = torch.Generator().manual_seed(T)
    h, y, weight = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.rand(D, generator=g) + 0.5
    expected_h = h + y
    got = add_rms_norm(h, y, weight, 1e-5)
    assert torch.equal(h, expected_h)  # the residual add is exact: one float32 add per element
    assert rel_rms(got, rms_norm_reference(expected_h, weight, 1e-5)) < FP32


def test_add_rms_norm_dispatch_keeps_the_reference_where_the_kernel_does_not_apply():
    g = torch.Generator().manual_seed(0)
    h, y, weight = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g), torch.rand(16, generator=g)
    for kernels, rows in ((AUTO, 40), (Kernels("torch"), 4)):  # a prefill-sized step; the torch choice
        a, b = h[:rows].clone(), h[:rows].clone()
        got = kernels.add_rms_norm(a, y[:rows], weight, 1e-5, most_new_tokens=rows)
        b.add_(y[:rows])
        assert torch.equal(a, b) and torch.equal(got, rms_norm_reference(b, weight, 1e-5))
    with pytest.raises(ValueError, match="expected contiguous CPU float32 or bfloat16 h, y and weight of one dtype"):
        add_rms_norm(h.bfloat16(), y, weight.bfloat16(), 1e-5)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bfloat16 ulps, elementwise (a, b: bfloat16 of one shape; their bit patterns apart)."""
    bits = [t.view(torch.int16).to(torch.int32) for t in (a, b)]
    ordered = [torch.where(x < 0, -(x & 0x7FFF), x) for x in bits]  # sign-magnitude -> a monotone integer
    return (ordered[0] - ordered[1]).abs()


@pytest.mark.parametrize("scale_in_fp32", [False, True])
@pytest.mark.parametrize("T, D", [(1, 512), (5, 37), (32, 4096)])
def test_add_rms_norm_in_bfloat16_rounds_where_the_reference_does(T, D, scale_in_fp32):
    """The residual sum rounds to bfloat16 as torch's add does (exact); the output, rounded where
    rms_norm_reference rounds, may differ from it only where the float32 scale's other summation
    order moves a product across a rounding boundary: never by more than an ulp, rarely at all."""
    g = torch.Generator().manual_seed(T * D)
    h, y = torch.randn(T, D, generator=g).bfloat16(), (3 * torch.randn(T, D, generator=g)).bfloat16()
    weight = (torch.rand(D, generator=g) + 0.5).bfloat16()
    expected_h = h + y
    got = add_rms_norm(h, y, weight, 1e-5, scale_in_fp32)
    expected = rms_norm_reference(expected_h, weight, 1e-5, scale_in_fp32)
    assert got.dtype == torch.bfloat16 and torch.equal(h, expected_h)
    ulps = bf16_ulps(got, expected)
    assert ulps.max() <= 1 and (ulps > 0).float().mean() < 1e-3


def reference_step(qkv, cos, sin, k_cache, v_cache, start, window, scale, heads, kv_heads):
    """The torch path of the executor: split, rope, cache write, SDPA (or the masked softmax)."""
    T, head_dim = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = (apply_rope(t.reshape(T, n, head_dim), cos, sin) for t, n in ((q, heads), (k, kv_heads)))
    k_cache[:, start : start + T] = k.transpose(0, 1)
    v_cache[:, start : start + T] = v.reshape(T, kv_heads, head_dim).transpose(0, 1)
    return attend(q, k_cache[:, : start + T], v_cache[:, : start + T], start, window, scale)


CASES = {  # heads, kv heads, head dim, rotary dim, new tokens, cached positions, window, scale
    "decode-gqa": (8, 2, 64, 64, 1, 40, None, None),
    "decode-mha-partial-rotary": (4, 4, 32, 16, 1, 9, None, 0.3),
    "chunk-of-5": (6, 3, 16, 16, 5, 12, None, None),
    "sliding-window-binds": (4, 2, 16, 16, 3, 20, 8, None),
    "first-tokens": (2, 1, 8, 8, 4, 0, None, None),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_writes_the_cache_and_matches_the_torch_path(case):
    heads, kv_heads, head_dim, rotary_dim, T, start, window, scale = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    capacity = start + T + 3
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = torch.randn(T, rotary_dim // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)  # [T, rotary_dim]
    cached = torch.randn(2, kv_heads, capacity, head_dim, generator=g)
    ours, theirs = cached.clone(), cached.clone()
    got = attend_decode(qkv, cos, sin, ours[0], ours[1], start, window, scale, heads, kv_heads)
    expected = reference_step(qkv, cos, sin, theirs[0], theirs[1], start, window, scale, heads, kv_heads)
    assert rel_rms(got, expected) < FP32
    assert rel_rms(ours, theirs) < FP32  # the new keys (rotated) and values, at their positions
    assert torch.equal(ours[:, :, start + T :], cached[:, :, start + T :])  # nothing written past them
    assert torch.equal(ours[:, :, :start], cached[:, :, :start])


@pytest.mark.parametrize("case", CASES)
def test_attention_in_bfloat16_rounds_where_torch_does(case):
    """bfloat16 qkv, cos/sin and caches: the rotated keys written into the cache equal the torch
    path's bit for bit (each rope product and sum rounded as its bfloat16 ops round), and the output
    equals SDPA's to bfloat16's rounding (an ulp here and there: host_attention's docstring says
    where and why they part)."""
    heads, kv_heads, head_dim, rotary_dim, T, start, window, scale = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    capacity = start + T + 3
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, generator=g).bfloat16()
    angles = torch.randn(T, rotary_dim // 2, generator=g)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).bfloat16() for f in (torch.cos, torch.sin))  # [T, rotary_dim]
    cached = torch.randn(2, kv_heads, capacity, head_dim, generator=g).bfloat16()
    ours, theirs = cached.clone(), cached.clone()
    got = attend_decode(qkv, cos, sin, ours[0], ours[1], start, window, scale, heads, kv_heads)
    expected = reference_step(qkv, cos, sin, theirs[0], theirs[1], start, window, scale, heads, kv_heads)
    assert got.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    assert rel_rms(got, expected) < BF16 / 4


def test_bfloat16_steps_of_several_new_tokens_keep_sdpa_and_the_reference_norm():
    """Dispatch: float32 takes the host kernels for any decode-sized step, bfloat16 only where each
    sequence brings one new token (its prefills keep SDPA's and the reference norm's bits), and
    larger steps never."""
    cache = torch.zeros(1, 2, 8, 16)
    for dtype, new_tokens, rows, expected in [
        (torch.float32, 5, 5, True), (torch.bfloat16, 1, 3, True), (torch.bfloat16, 5, 5, False),
        (torch.float32, 33, 33, False),
    ]:  # fmt: skip
        qkv = torch.zeros(rows, 3 * 2 * 16, dtype=dtype)
        assert AUTO.attends_on_host(qkv, cache.to(dtype), new_tokens) is expected
        assert Kernels("torch").attends_on_host(qkv, cache.to(dtype), new_tokens) is False
        h = torch.randn(rows, 16).to(dtype)
        assert host_norm_applies(h, h.clone(), torch.ones(16, dtype=dtype), new_tokens) is expected


def test_attention_names_what_it_expected():
    qkv, cache = torch.zeros(1, 3 * 16), torch.zeros(1, 4, 16)
    trig = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="expected CPU float32 or bfloat16 qkv .* caches of its dtype"):
        attend_decode(qkv.bfloat16(), trig, trig, cache, cache, 0, None, None, 1, 1)
    with pytest.raises(ValueError, match="positions within the cache's 4"):
        attend_decode(qkv, trig, trig, cache, cache, 4, None, None, 1, 1)
