"""A layer's experts split between the device (Triton, here its interpreter) and the host kernels:
the sum equals moe_experts_reference over all the experts in one buffer, within the dtype's
tolerance; HOST_SLOT experts add nothing to the device's share, and without host_share they are
refused as unslotted."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moeinf.kernels import hybrid_experts, moe
from moeinf.kernels.expert_activation import SILU, ExpertActivation
from moeinf.kernels.host_experts import SecondBuffers
from moeinf.kernels.ops import Kernels
from moeinf.kernels.reference import moe_experts_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms
from moeinf.runtime.cache.placement import HOST

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=2.0)


def split_case(T, dtype, on_host, D=32, F=24, E=6, K=2, seed=0, biases=False):
    """All E experts in one buffer (the reference's), and the same split: the experts of `on_host`
    in a host buffer (record r = their rank), the rest in device slots (slot = expert index)."""
    g = torch.Generator().manual_seed(seed)
    w13 = (2 * torch.randn(E, 2 * F, D, generator=g) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, F, generator=g) / F**0.5).to(dtype)
    b13 = torch.randn(E, 2 * F, generator=g).to(dtype) if biases else None
    b2 = torch.randn(E, D, generator=g).to(dtype) if biases else None
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    weights = torch.rand(T, K, generator=g)
    records = torch.full((E,), -1, dtype=torch.int64)
    records[on_host] = torch.arange(len(on_host))
    slots = torch.arange(E)
    slots[on_host] = -1  # as the pool's table: the host's experts have no slot
    host_w13, host_w2 = w13[on_host].clone(), w2[on_host].clone()
    host_b = dict(b13=b13[on_host].clone(), b2=b2[on_host].clone()) if biases else {}
    host = SecondBuffers(records, host_w13, host_w2, **host_b)
    bias = dict(b13=b13, b2=b2) if biases else {}
    return x, ids, weights, w13, w2, slots, host, bias


@pytest.mark.parametrize("T", [1, 5, 20])
@pytest.mark.parametrize("on_host", [[1, 4], [0, 1, 2, 3, 4, 5], []], ids=["some", "all", "none"])
def test_the_split_sums_to_the_reference(T, on_host):
    x, ids, weights, w13, w2, slots, host, _ = split_case(T, torch.float32, on_host, seed=T)
    got = hybrid_experts.hybrid_moe_experts(x, ids, weights, w13, w2, slots, host)
    expected = moe_experts_reference(x, ids, weights, w13, w2, torch.arange(6))
    assert rel_rms(got, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("activation", [SILU, CLAMPED], ids=["silu", "clamped"])
def test_biases_activations_bfloat16_and_a_worker(activation):
    """The host share on a worker thread, as on CUDA; bfloat16 within its tolerance."""
    for dtype in (torch.float32, torch.bfloat16):
        x, ids, weights, w13, w2, slots, host, bias = split_case(8, dtype, [2, 3], seed=4, biases=True)
        with ThreadPoolExecutor(1) as worker:
            on_worker = dataclasses.replace(host, worker=worker)
            got = Kernels("triton").moe_experts(
                x, ids, weights, w13, w2, slots, activation=activation, host=on_worker, **bias
            )
        expected = moe_experts_reference(
            x, ids, weights.to(dtype) if dtype == torch.bfloat16 else weights, w13, w2, torch.arange(6),
            activation=activation, **bias,
        )  # fmt: skip
        assert got.dtype == dtype and rel_rms(got, expected) < TOLERANCE[dtype]


def test_host_slot_experts_add_nothing_to_the_device_share():
    x, ids, weights, w13, w2, _, _, _ = split_case(6, torch.float32, [], seed=2)
    slots = torch.arange(6)
    slots[3] = moe.HOST_SLOT
    device = moe.fused_moe(x, ids, weights, w13, w2, slots, host_share=True)
    masked = weights.masked_fill(ids == 3, 0.0)  # expert 3's pairs weighed zero instead
    assert rel_rms(device, moe_experts_reference(x, ids, masked, w13, w2, torch.arange(6))) < 1e-6
    with pytest.raises(ValueError, match="expert_slots of routed experts"):
        moe.fused_moe(x, ids, weights, w13, w2, slots)  # without host_share: an unslotted expert


def test_the_kernels_host_slot_is_the_placements():
    assert moe.HOST_SLOT == HOST


@pytest.mark.parametrize("on_host", [[1, 4], [0, 1, 2, 3, 4, 5], []], ids=["some", "all", "none"])
def test_the_torch_device_share_sums_to_the_reference(on_host):
    """kernels="torch" on CUDA: the device's share in torch, pair by pair, beside the host's. The
    host experts' slots hold NaN, so a device share that read one would poison the sum."""
    for dtype in (torch.float32, torch.bfloat16):
        x, ids, weights, w13, w2, slots, host, bias = split_case(7, dtype, on_host, seed=9, biases=True)
        poisoned = w13.clone()
        poisoned[on_host] = float("nan")
        got = hybrid_experts.hybrid_moe_experts(x, ids, weights, poisoned, w2, slots, host, **bias, triton=False)
        expected = moe_experts_reference(x, ids, weights, w13, w2, torch.arange(6), **bias)
        assert got.dtype == dtype and rel_rms(got, expected) < TOLERANCE[dtype]
