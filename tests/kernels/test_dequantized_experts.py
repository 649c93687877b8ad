"""The prefill path of quantized experts on the CPU: dequantize_slots gives quantize.dequantize's
values bit for bit (int8, int4 and grouped int8 symmetric and asymmetric, float16 and bfloat16
scales, record views), and dequantized_moe_experts matches quantized_moe_experts_reference within
float32's tolerance for any chunking, with act-order input orders, and gives the same bits whatever
the chunk size."""

import pytest
import torch

from moeinf.kernels import dequantized_experts
from moeinf.kernels.dequantized_experts import dequantized_moe_experts
from moeinf.kernels.host_quant_experts import dequantize_slots
from moeinf.kernels.quantize import dequantize, quantized_moe_experts_reference
from moeinf.kernels.tolerance import TOLERANCE, rel_rms
from tests.kernels.test_host_quant_experts import FORMATS, experts, make_case, random_input_orders, record_views

NAMES = ["int8", "int8-odd", "int4-g32-asym-bf16", "int4-g64-sym-bf16", "int4-row-asym-fp16"]
NAMES += ["int8-g32-sym-fp16", "int8-g64-asym-bf16", "int8-row-asym-fp16"]


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_slots_equals_dequantize(name):
    w13, w2, slots = experts(name)
    picked = slots[[3, 0, 7]]
    for m in (w13, w2):
        assert torch.equal(dequantize_slots(m, picked), dequantize(m[picked]))
    order = torch.randperm(w13.q.shape[0], generator=torch.Generator().manual_seed(1))
    viewed = record_views(w2, order)  # slot s in record order[s]
    assert torch.equal(dequantize_slots(viewed, order[picked]), dequantize(w2[picked]))
    with pytest.raises(ValueError, match="expected slots in 0..11"):
        dequantize_slots(w2, torch.tensor([12]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [33, 70])
def test_prefill_path_matches_the_reference_for_any_chunking(name, T, monkeypatch):
    x, ids, weights, w13, w2, slots = make_case(name, T, 2, seed=T)
    expected = quantized_moe_experts_reference(x, ids, weights, w13, w2, slots)
    whole = dequantized_moe_experts(x, ids, weights, w13, w2, slots)
    assert whole.dtype == torch.float32 and rel_rms(whole, expected) < TOLERANCE[torch.float32]
    D, F, _ = FORMATS[name]
    monkeypatch.setattr(dequantized_experts, "CHUNK_BYTES", 3 * 4 * 3 * D * F)  # three experts a chunk
    assert torch.equal(dequantized_moe_experts(x, ids, weights, w13, w2, slots), whole)


def test_prefill_path_with_input_orders():
    x, ids, weights, w13, w2, slots = make_case("int4-g32-asym-bf16", 40, 2, seed=2)
    perm = random_input_orders(w13.shape[0], w13.shape[2], seed=4)
    got = dequantized_moe_experts(x, ids, weights, w13, w2, slots, input_perm=perm)
    expected = quantized_moe_experts_reference(x, ids, weights, w13, w2, slots, input_perm=perm)
    assert rel_rms(got, expected) < TOLERANCE[torch.float32]
    assert rel_rms(dequantized_moe_experts(x, ids, weights, w13, w2, slots), expected) > 0.1
