"""GPTQ and compressed-tensors pack-quantized weights, unpacked into moeinf's packed layout.

Oracles: words packed by hand below; a GPTQ packer written from AutoGPTQ's pack loops
(tests/quant_checkpoints.py) over random integer weights whose float values are known exactly;
compressed-tensors' own compressor and decompressor. Every comparison is exact: unpacking moves
bits, and the product of an (at most 8-bit) integer and a 16-bit float scale is a float32.
"""

import pytest
import torch

from moeinf.errors import ConfigError, TensorDtypeError, TensorShapeError
from moeinf.loaders.quant_formats import (
    PackedWeight,
    QuantScheme,
    WeightQuant,
    dequantize_gptq,
    dequantize_packed,
    module_of,
    packed_tensors,
    parse_quantization_config,
    scatters_groups,
    unpack_compressed_tensors,
    unpack_gptq,
    unpack_module,
)
from tests.quant_checkpoints import ct_compress, ct_decompress, ct_scheme, pack_gptq, random_gptq


def int32(word: int) -> int:
    """An unsigned 32-bit word as the int32 torch stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


# ---------------------------------------------------------------------------------------------
# GPTQ, by hand

# 4 bits, N = 8 outputs, K = 8 inputs, one group of 8. qweight [K / 8, N] = [1, 8]: word n holds
# output n's 8 inputs, input j in bits 4j..4j+3.
#   output 0: 0x76543210 -> inputs 0, 1, 2, 3, 4, 5, 6, 7
#   output 1: 0xFEDCBA98 -> inputs 8, 9, ..., 15 (negative as an int32: -19088744)
#   outputs 2..7: 0
QWEIGHT4 = torch.tensor([[int32(0x76543210), int32(0xFEDCBA98), 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
# qzeros [K / G, N / 8] = [1, 1]: zero of output j in bits 4j..4j+3. v1 ("gptq") stores zero - 1:
#   0x0123456F -> stored F, 6, 5, 4, 3, 2, 1, 0 -> zeros (s + 1) & 15 = 0, 7, 6, 5, 4, 3, 2, 1
QZEROS4_ASYM_V1 = torch.tensor([[int32(0x0123456F)]], dtype=torch.int32)
# symmetric: every zero 8, stored 7 in v1 (0x77777777, what real sym checkpoints hold) and 8 in v2
QZEROS4_SYM_V1 = torch.tensor([[int32(0x77777777)]], dtype=torch.int32)
QZEROS4_SYM_V2 = torch.tensor([[int32(0x88888888)]], dtype=torch.int32)
SCALES4 = torch.tensor([[1.0, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]], dtype=torch.float16)  # [K / G, N]


def test_gptq_int4_by_hand_asymmetric_v1():
    packed = unpack_gptq(QWEIGHT4, QZEROS4_ASYM_V1, SCALES4, bits=4, group_size=8, checkpoint_format="gptq")
    # moeinf: byte j of a row = input 2j (low nibble) | input 2j + 1 (high nibble)
    expected_q = torch.zeros(8, 4, dtype=torch.uint8)
    expected_q[0] = torch.tensor([0x10, 0x32, 0x54, 0x76])
    expected_q[1] = torch.tensor([0x98, 0xBA, 0xDC, 0xFE])
    assert packed.bits == 4 and packed.group_size == 8 and packed.perm is None and packed.shape == (8, 8)
    assert torch.equal(packed.q, expected_q)
    assert torch.equal(packed.zero, torch.tensor([[0], [7], [6], [5], [4], [3], [2], [1]], dtype=torch.uint8))
    assert packed.scale.dtype == torch.float16 and torch.equal(packed.scale, SCALES4.T)
    weight = dequantize_packed(packed)
    assert torch.equal(weight[0], torch.arange(8, dtype=torch.float32))  # (k - 0) * 1
    assert torch.equal(weight[1], (torch.arange(8, 16) - 7) * 0.5)  # 0.5, 1.0, ..., 4.0
    assert torch.equal(weight[2], torch.full((8,), -1.5))  # (0 - 6) * 0.25
    assert torch.equal(weight[7], torch.full((8,), -0.25))  # (0 - 1) * 0.25
    assert torch.equal(weight, dequantize_gptq(QWEIGHT4, QZEROS4_ASYM_V1, SCALES4, bits=4, group_size=8))


@pytest.mark.parametrize(
    "qzeros, checkpoint_format", [(QZEROS4_SYM_V1, "gptq"), (QZEROS4_SYM_V2, "gptq_v2")], ids=["v1", "v2"]
)
def test_gptq_int4_by_hand_symmetric(qzeros, checkpoint_format):
    packed = unpack_gptq(
        QWEIGHT4, qzeros, SCALES4, bits=4, group_size=-1, sym=True, checkpoint_format=checkpoint_format
    )
    assert packed.zero is None and packed.group_size == 8  # every zero is 8: the layout's default
    weight = dequantize_packed(packed)
    assert torch.equal(weight[0], torch.arange(-8, 0, dtype=torch.float32))  # (k - 8) * 1
    assert torch.equal(weight[1], torch.arange(0, 8) * 0.5)


def test_gptq_sym_catches_a_v1_v2_mixup():
    # v2 zeros (8) read as v1 decode to 9: the config's sym disagrees with the tensors
    with pytest.raises(ConfigError, match="found 9.*other one"):
        unpack_gptq(QWEIGHT4, QZEROS4_SYM_V2, SCALES4, bits=4, group_size=8, sym=True, checkpoint_format="gptq")


# 8 bits, N = 4, K = 4, per channel (group_size -1). qweight [K / 4, N] = [1, 4], input j in byte j:
#   output 0: 0x04030201 -> 1, 2, 3, 4;  output 1: 0xFF80007F -> 127, 0, 128, 255
#   outputs 2, 3: 0x80808080 -> 128 each
# qzeros [1, N / 4] = [1, 1], v1 symmetric: 0x7F7F7F7F -> stored 127 -> zeros 128
QWEIGHT8 = torch.tensor(
    [[int32(0x04030201), int32(0xFF80007F), int32(0x80808080), int32(0x80808080)]], dtype=torch.int32
)
QZEROS8 = torch.tensor([[int32(0x7F7F7F7F)]], dtype=torch.int32)
SCALES8 = torch.tensor([[0.5, 1.0, 2.0, 4.0]], dtype=torch.float16)


def test_gptq_int8_by_hand_per_channel():
    packed = unpack_gptq(QWEIGHT8, QZEROS8, SCALES8, bits=8, group_size=-1, sym=True)
    # symmetric per channel: moeinf's int8 layout, q = code - 128, scale float32 [N]
    assert packed.bits == 8 and packed.zero is None and packed.group_size == 4
    expected = torch.tensor([[-127, -126, -125, -124], [-1, -128, 0, 127], [0] * 4, [0] * 4], dtype=torch.int8)
    assert torch.equal(packed.q, expected)
    assert packed.scale.dtype == torch.float32 and torch.equal(packed.scale, torch.tensor([0.5, 1.0, 2.0, 4.0]))
    weight = dequantize_packed(packed)
    assert torch.equal(weight[0], torch.tensor([-63.5, -63.0, -62.5, -62.0]))
    assert torch.equal(weight[1], torch.tensor([-1.0, -128.0, 0.0, 127.0]))
    assert torch.equal(weight, dequantize_gptq(QWEIGHT8, QZEROS8, SCALES8, bits=8, group_size=-1))


# ---------------------------------------------------------------------------------------------
# GPTQ, round trips through a packer written from the definition


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True], ids=["in-order", "desc_act"])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_round_trip(bits, sym, group_size, desc_act, checkpoint_format):
    seed = bits * 1000 + group_size * 10 + sym * 4 + desc_act * 2 + (checkpoint_format == "gptq")
    ref = random_gptq(48, 256, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, seed=seed)
    tensors = pack_gptq(ref.codes, ref.zeros, ref.scales, ref.g_idx, bits=bits, checkpoint_format=checkpoint_format)
    assert tensors["qweight"].shape == (256 * bits // 32, 48) and tensors["scales"].shape[1] == 48
    args = {"bits": bits, "group_size": group_size, "checkpoint_format": checkpoint_format}

    assert torch.equal(dequantize_gptq(**tensors, **args), ref.weight)  # the oracle itself
    packed = unpack_gptq(**tensors, sym=sym, **args)
    assert packed.shape == (48, 256)
    assert torch.equal(dequantize_packed(packed), ref.weight)

    group = 256 if group_size == -1 else group_size
    assert packed.group_size == group
    assert (packed.zero is None) == sym
    if bits == 4:
        assert packed.q.dtype == torch.uint8 and packed.q.shape == (48, 128)
    else:
        assert packed.q.dtype == torch.int8 and packed.q.shape == (48, 256)
    if bits == 8 and sym and group_size == -1:
        assert packed.scale.dtype == torch.float32 and packed.scale.shape == (48,)
    else:
        assert packed.scale.dtype == torch.float16 and packed.scale.shape == (48, 256 // group)
    if desc_act and group_size != -1:
        # the packed matrix is W[:, perm], its groups contiguous: column j belongs to group j // G
        assert packed.perm is not None and torch.equal(packed.perm.sort().values, torch.arange(256))
        assert torch.equal(ref.g_idx[packed.perm].long(), torch.arange(256) // group)
        assert torch.equal(dequantize_packed(packed, input_order=False), ref.weight[:, packed.perm])
    else:
        assert packed.perm is None  # in order, or one group (desc_act with group_size -1 needs no permutation)


def test_gptq_v1_zero_of_zero():
    # a zero of 0 is stored as 15 in v1 and decodes back to 0 ((15 + 1) & 15), in every position
    ref = random_gptq(16, 64, bits=4, group_size=32, sym=False, desc_act=False, seed=3)
    zeros = ref.zeros.clone()
    zeros[:, 0] = 0
    codes = ref.codes
    weight = (codes - zeros[:, ref.g_idx.long()]).double() * ref.scales[:, ref.g_idx.long()].double()
    tensors = pack_gptq(codes, zeros, ref.scales, bits=4, checkpoint_format="gptq")
    packed = unpack_gptq(**tensors, bits=4, group_size=32)
    assert torch.equal(packed.zero[:, 0], torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(dequantize_packed(packed), weight.float())


def test_gptq_bfloat16_scales_are_kept():
    ref = random_gptq(16, 64, bits=4, group_size=32, sym=True, desc_act=False, scale_dtype=torch.bfloat16)
    packed = unpack_gptq(**pack_gptq(ref.codes, ref.zeros, ref.scales, bits=4), bits=4, group_size=32)
    assert packed.scale.dtype == torch.bfloat16 and torch.equal(dequantize_packed(packed), ref.weight)


def test_gptq_bad_tensors():
    ref = random_gptq(16, 64, bits=4, group_size=32, sym=False, desc_act=True, seed=5)
    good = pack_gptq(ref.codes, ref.zeros, ref.scales, ref.g_idx, bits=4)
    args = {"bits": 4, "group_size": 32}
    with pytest.raises(TensorShapeError, match=r"expected qzeros \[2, 2\].*found \[2, 1\]"):
        unpack_gptq(**{**good, "qzeros": good["qzeros"][:, :1]}, **args)
    with pytest.raises(TensorShapeError, match=r"expected scales \[2, 16\]"):
        unpack_gptq(**{**good, "scales": good["scales"][:1]}, **args)
    with pytest.raises(TensorDtypeError, match="qweight to be a 2-D int32"):
        unpack_gptq(**{**good, "qweight": good["qweight"].float()}, **args)
    with pytest.raises(TensorShapeError, match="multiple of group_size 48"):
        unpack_gptq(**good, bits=4, group_size=48)
    with pytest.raises(TensorDtypeError, match="float16 or bfloat16 scales.*found torch.float32"):
        unpack_gptq(**{**good, "scales": good["scales"].float()}, **args)
    lopsided = good["g_idx"].clone()
    lopsided[lopsided == 1] = 0
    lopsided[0] = 1  # group 1 now holds one input, group 0 the other 63
    with pytest.raises(TensorShapeError, match="each of the 2 groups 32 inputs, found group 0 with 63"):
        unpack_gptq(**{**good, "g_idx": lopsided}, **args)
    with pytest.raises(ConfigError, match="bits 4 or 8, found 3"):
        unpack_gptq(**good, bits=3, group_size=32)


# ---------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized, against the package's own compressor and decompressor

CT_CASES = [
    (4, 32, True),
    (4, 64, False),
    (4, None, True),
    (4, None, False),
    (8, 32, True),
    (8, 128, False),
    (8, None, True),
    (8, None, False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, group_size, symmetric", CT_CASES)
def test_compressed_tensors_matches_the_package(bits, group_size, symmetric, dtype):
    pytest.importorskip("compressed_tensors")
    gen = torch.Generator().manual_seed(bits * 1000 + (group_size or 0) + symmetric)
    weight = (torch.randn(40, 256, generator=gen) * 0.05 + 0.01).to(dtype)
    scheme = ct_scheme(bits, group_size, symmetric)
    state = ct_compress(weight, scheme)
    assert ("weight_zero_point" in state) == (not symmetric)
    packed = unpack_compressed_tensors(
        state["weight_packed"],
        state["weight_scale"],
        state["weight_shape"],
        state.get("weight_zero_point"),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
    mine = dequantize_packed(packed)
    # the package computes (q - zp) * scale in the scale's dtype: with float32 scales nothing rounds
    assert torch.equal(mine, ct_decompress(state, scheme, torch.float32))
    # in the checkpoint's dtype it rounds each product once, as casting the exact float32 one does
    theirs = ct_decompress(state, scheme)
    assert theirs.dtype == dtype and torch.equal(mine.to(dtype), theirs)

    group = 256 if group_size is None else group_size
    assert packed.group_size == group and packed.perm is None and (packed.zero is None) == symmetric
    if bits == 8 and group_size is None and symmetric:
        assert packed.scale.dtype == torch.float32 and packed.scale.shape == (40,)
    else:
        assert packed.scale.dtype == dtype and packed.scale.shape == (40, 256 // group)


def test_compressed_tensors_unpacked_zero_points():
    # releases before compressed-tensors PR #296 stored asymmetric zeros unpacked, int8 [N, K / G]
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    scheme = ct_scheme(4, 32, symmetric=False)
    state = ct_compress(weight, scheme)
    zero_point = unpack_from_int32(state["weight_zero_point"], 4, torch.Size([24, 4]), packed_dim=0)
    assert zero_point.dtype == torch.int8 and zero_point.shape == (24, 4)
    args = {"bits": 4, "group_size": 32, "symmetric": False}
    packed = unpack_compressed_tensors(
        state["weight_packed"], state["weight_scale"], state["weight_shape"], state["weight_zero_point"], **args
    )
    legacy = unpack_compressed_tensors(
        state["weight_packed"], state["weight_scale"], state["weight_shape"], zero_point, **args
    )
    assert torch.equal(dequantize_packed(packed), dequantize_packed(legacy))
    assert torch.equal(dequantize_packed(legacy), ct_decompress(state, scheme, torch.float32))


def test_compressed_tensors_group_act_order():
    # actorder "group" (written by compressed-tensors < 0.20) stores weight_g_idx [K]; its weights
    # are W[n, k] = (q[n, k] - zp[n, g]) * scale[n, g] with g = g_idx[k]. The package packs, the
    # expected weights come from that definition.
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    gen = torch.Generator().manual_seed(11)
    rows, cols, group = 16, 128, 32
    signed = torch.randint(-8, 8, (rows, cols), generator=gen, dtype=torch.int8)
    zp = torch.randint(-8, 8, (rows, cols // group), generator=gen, dtype=torch.int8)
    scale = (torch.rand(rows, cols // group, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[torch.randperm(cols, generator=gen)] = (torch.arange(cols) // group).to(torch.int32)
    expected = (signed.double() - zp.double()[:, g_idx.long()]) * scale.double()[:, g_idx.long()]
    packed = unpack_compressed_tensors(
        pack_to_int32(signed, 4),
        scale,
        torch.tensor([rows, cols]),
        pack_to_int32(zp, 4, packed_dim=0),
        g_idx,
        bits=4,
        group_size=group,
        symmetric=False,
    )
    assert packed.perm is not None and torch.equal(g_idx[packed.perm].long(), torch.arange(cols) // group)
    assert torch.equal(dequantize_packed(packed), expected.float())


def test_compressed_tensors_bad_tensors():
    pytest.importorskip("compressed_tensors")
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    scheme = ct_scheme(4, 32, symmetric=False)
    state = ct_compress(weight, scheme)
    packed, scale, shape, zero_point = (
        state[k] for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    )
    args = {"bits": 4, "group_size": 32, "symmetric": False}
    with pytest.raises(TensorShapeError, match=r"expected weight_packed \[16, 16\]"):
        unpack_compressed_tensors(packed, scale, torch.tensor([16, 128]), zero_point, **args)
    with pytest.raises(TensorShapeError, match=r"expected weight_scale \[16, 2\]"):
        unpack_compressed_tensors(packed, scale[:, :1], shape, zero_point, **args)
    with pytest.raises(TensorShapeError, match="expected a weight_zero_point"):
        unpack_compressed_tensors(packed, scale, shape, **args)
    with pytest.raises(TensorShapeError, match=r"weight_zero_point int32 \[2, 2\]"):
        unpack_compressed_tensors(packed, scale, shape, zero_point[:1], **args)
    with pytest.raises(ConfigError, match="symmetric, so weight_zero_point should be 0"):
        unpack_compressed_tensors(packed, scale, shape, zero_point, bits=4, group_size=32, symmetric=True)
    with pytest.raises(TensorDtypeError, match="float16 or bfloat16 scales"):
        unpack_compressed_tensors(packed, scale.float(), shape, zero_point, **args)


def test_packed_weight_shape():
    q = torch.zeros(3, 5, dtype=torch.uint8)
    assert PackedWeight(4, q, torch.ones(3, 1, dtype=torch.float16), None, 10).shape == (3, 10)
    assert PackedWeight(8, q.to(torch.int8), torch.ones(3), None, 5).shape == (3, 5)


# ---------------------------------------------------------------------------------------------
# quantization_config, as published

# GPTQModel's config of its 4-bit releases, Qwen3-30B-A3B-GPTQ-Int4 included (GPTQModel 2.2.0 era:
# e.g. huggingface.co/Matt300209/8B-instruct-int4, TheS3b/MNLP_M3_quantized_model quantize_config.json)
QWEN3_MOE_GPTQ_INT4 = {
    "bits": 4,
    "group_size": 128,
    "desc_act": False,
    "sym": True,
    "lm_head": False,
    "quant_method": "gptq",
    "checkpoint_format": "gptq",
    "pack_dtype": "int32",
    "meta": {
        "quantizer": ["gptqmodel:2.2.0"],
        "uri": "https://github.com/modelcloud/gptqmodel",
        "damp_percent": 0.01,
        "damp_auto_increment": 0.0025,
        "static_groups": False,
        "true_sequential": True,
        "mse": 0.0,
    },
}
# AutoGPTQ's (TheBloke's releases): no checkpoint_format, so v1
AUTOGPTQ_DESC_ACT = {
    "bits": 4,
    "group_size": 128,
    "damp_percent": 0.1,
    "desc_act": True,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
    "quant_method": "gptq",
}
# huggingface.co/JunHowie/Seed-OSS-36B-Instruct-GPTQ-Int8
GPTQ_INT8 = {
    "bits": 8,
    "group_size": 128,
    "desc_act": False,
    "hyb_act": False,
    "sym": True,
    "lm_head": False,
    "quant_method": "gptq",
    "checkpoint_format": "gptq",
    "pack_dtype": "int32",
    "meta": {"quantizer": ["gptqmodel:4.1.0"], "damp_percent": 0.05, "static_groups": False, "v2": False},
}
# huggingface.co/TheS3b/MNLP_M3_quantized_model: asymmetric, v2 zeros
GPTQ_V2_ASYM = {
    "bits": 4,
    "group_size": 64,
    "desc_act": False,
    "sym": False,
    "lm_head": False,
    "quant_method": "gptq",
    "checkpoint_format": "gptq_v2",
    "pack_dtype": "int32",
    "meta": {"quantizer": ["gptqmodel:2.2.0"], "uri": "https://github.com/modelcloud/gptqmodel"},
}
# llm-compressor W4A16 of a Qwen3 MoE (huggingface.co/Yi30/test-llmc config.json; ignore shortened
# to two layers' routers)
QWEN3_MOE_W4A16 = {
    "config_groups": {
        "group_0": {
            "format": "pack-quantized",
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 128,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "scale_dtype": None,
                "strategy": "group",
                "symmetric": True,
                "type": "int",
                "zp_dtype": None,
            },
        }
    },
    "format": "pack-quantized",
    "global_compression_ratio": None,
    "ignore": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
# asymmetric W4A16 (huggingface.co/t-tech/T-pro-it-2.0-AWQ: AWQ-calibrated, saved by llm-compressor)
W4A16_ASYM = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 128,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": False,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "global_compression_ratio": None,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
# W8A16 as llm-compressor saves it: compressed-tensors' W8A16 preset (8-bit int weights, groups of
# 128, symmetric) is weight-only, so pack-quantized; regex ignores as in Qwen MoE recipes
W8A16 = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": "static",
                "block_structure": None,
                "dynamic": False,
                "group_size": 128,
                "num_bits": 8,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": ["re:.*lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$"],
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
}
# channel-wise 8-bit weights (the W8A16 of earlier llm-compressor releases)
W8A16_CHANNEL = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {"group_size": None, "num_bits": 8, "strategy": "channel", "symmetric": True, "type": "int"},
        }
    },
    "format": "pack-quantized",
    "ignore": ["lm_head"],
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
# huggingface.co/TechxGenus/DeepSeek-Coder-V2-Lite-Base-AWQ
AWQ = {
    "bits": 4,
    "group_size": 64,
    "modules_to_not_convert": ["mlp.gate"],
    "quant_method": "awq",
    "version": "gemm",
    "zero_point": True,
}
EXPERT = "model.layers.3.mlp.experts.17.down_proj"


def test_parse_qwen3_moe_gptq_int4():
    scheme = parse_quantization_config({"quantization_config": QWEN3_MOE_GPTQ_INT4})
    assert scheme.method == "gptq" and scheme.checkpoint_format == "gptq"
    assert scheme.weight_quant(EXPERT) == WeightQuant(bits=4, group_size=128, symmetric=True, act_order=False)
    assert scheme.weight_quant("lm_head") is None


def test_parse_gptq_variants():
    auto = parse_quantization_config({"quantization_config": AUTOGPTQ_DESC_ACT})
    assert auto.checkpoint_format == "gptq" and auto.default == WeightQuant(4, 128, True, True)
    assert parse_quantization_config({"quantization_config": GPTQ_INT8}).default == WeightQuant(8, 128, True, False)
    v2 = parse_quantization_config({"quantization_config": GPTQ_V2_ASYM})
    assert v2.checkpoint_format == "gptq_v2" and v2.default == WeightQuant(4, 64, False, False)
    per_channel = parse_quantization_config({"quantization_config": {**GPTQ_INT8, "group_size": -1}})
    assert per_channel.default.group_size is None


def test_gptq_dynamic_and_block_modules():
    # GPTQModel's dynamic: the first pattern that re.matches wins; "-:" leaves the module unquantized
    config = {
        **QWEN3_MOE_GPTQ_INT4,
        "dynamic": {"-:.*mlp.gate$": {}, r"+:.*\.down_proj": {"bits": 8}, r".*layers\.0\..*": {"group_size": 32}},
    }
    scheme = parse_quantization_config({"quantization_config": config})
    assert scheme.weight_quant("model.layers.3.mlp.gate") is None
    assert scheme.weight_quant(EXPERT) == WeightQuant(8, 128, True, False)
    assert scheme.weight_quant("model.layers.0.mlp.experts.1.up_proj") == WeightQuant(4, 32, True, False)
    assert scheme.weight_quant("model.layers.3.self_attn.q_proj") == WeightQuant(4, 128, True, False)
    block = {**AUTOGPTQ_DESC_ACT, "modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.experts.0.up_proj"]]}
    scheme = parse_quantization_config({"quantization_config": block})
    assert scheme.weight_quant("model.layers.2.self_attn.q_proj") is not None
    assert scheme.weight_quant("model.layers.2.mlp.experts.0.up_proj") is not None
    assert scheme.weight_quant("model.layers.2.self_attn.o_proj") is None


def test_parse_llm_compressor_w4a16():
    scheme = parse_quantization_config({"quantization_config": QWEN3_MOE_W4A16})
    assert scheme.method == "compressed-tensors" and scheme.checkpoint_format == "pack-quantized"
    assert scheme.weight_quant(EXPERT) == WeightQuant(4, 128, True, False)
    assert scheme.weight_quant("model.layers.0.mlp.gate") is None  # ignored by name
    assert scheme.weight_quant("model.layers.2.mlp.gate") is not None  # not in this shortened list
    assert scheme.weight_quant("lm_head") is None
    asym = parse_quantization_config({"quantization_config": W4A16_ASYM})
    assert asym.weight_quant(EXPERT) == WeightQuant(4, 128, False, False)


def test_parse_llm_compressor_w8a16():
    scheme = parse_quantization_config({"quantization_config": W8A16})
    assert scheme.weight_quant(EXPERT) == WeightQuant(8, 128, True, False)  # actorder "static": no g_idx
    assert scheme.weight_quant("model.layers.3.mlp.gate") is None  # re:.*mlp.gate$
    assert scheme.weight_quant("model.layers.3.mlp.gate_proj") is not None
    assert scheme.weight_quant("lm_head") is None
    channel = parse_quantization_config({"quantization_config": W8A16_CHANNEL})
    assert channel.weight_quant(EXPERT) == WeightQuant(8, None, True, False)


def test_compressed_tensors_target_priority():
    # as compressed_tensors.utils.match_targets: exact names, then regexes, then the class "Linear"
    weights = QWEN3_MOE_W4A16["config_groups"]["group_0"]["weights"]
    config = {
        **QWEN3_MOE_W4A16,
        "config_groups": {
            "experts": {"targets": ["Linear"], "weights": weights},
            "down": {"targets": ["re:.*down_proj$"], "weights": {**weights, "num_bits": 8, "actorder": "group"}},
            "one": {"targets": [EXPERT], "weights": {**weights, "group_size": 32}},
        },
    }
    scheme = parse_quantization_config({"quantization_config": config})
    assert scheme.weight_quant(EXPERT).group_size == 32
    assert scheme.weight_quant("model.layers.3.mlp.experts.2.down_proj") == WeightQuant(8, 128, True, True)
    assert scheme.weight_quant("model.layers.3.mlp.experts.2.up_proj") == WeightQuant(4, 128, True, False)
    assert isinstance(scheme, QuantScheme)


def test_handled_elsewhere_and_absent():
    assert parse_quantization_config({}) is None
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert parse_quantization_config({"quantization_config": fp8}) is None
    assert parse_quantization_config({"quantization_config": {"quant_method": "mxfp4"}}) is None


@pytest.mark.parametrize(
    "quantization, message",
    [
        (AWQ, "quant_method 'awq' is not supported.*expected gptq"),
        ({"quant_method": "bitsandbytes", "_load_in_8bit": True}, "'bitsandbytes' is not supported"),
        ({"quant_method": "gguf"}, "'gguf' is not supported"),
        ({"quant_method": "hqq"}, "'hqq' is not supported"),
        ({**QWEN3_MOE_GPTQ_INT4, "bits": 3}, "expected bits 4 or 8, found 3"),
        ({**QWEN3_MOE_GPTQ_INT4, "checkpoint_format": "gptq_marlin"}, "found 'gptq_marlin'"),
        ({**QWEN3_MOE_GPTQ_INT4, "pack_dtype": "int16"}, "pack_dtype 'int32'"),
        ({**W4A16_ASYM, "format": "nvfp4-pack-quantized"}, "format 'pack-quantized'.*found 'nvfp4-pack-quantized'"),
        (
            {
                **W4A16_ASYM,
                "format": "int-quantized",
                "config_groups": {
                    "g": {
                        **W4A16_ASYM["config_groups"]["group_0"],
                        "input_activations": {"num_bits": 8, "dynamic": True},
                    }
                },
            },
            "found 'int-quantized'",
        ),
        (
            {
                **W4A16_ASYM,
                "config_groups": {
                    "g": {
                        **W4A16_ASYM["config_groups"]["group_0"],
                        "input_activations": {"num_bits": 8, "dynamic": True},
                    }
                },
            },
            "input_activations null",
        ),
        (
            {**W4A16_ASYM, "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}}},
            "strategy 'group' or 'channel', found 'tensor'",
        ),
        ({**W4A16_ASYM, "quantization_status": "frozen"}, "quantization_status 'compressed'"),
        ({**W4A16_ASYM, "sparsity_config": {"format": "sparse-24-bitmask"}}, "no sparsity_config"),
    ],
    ids=[
        "awq",
        "bitsandbytes",
        "gguf",
        "hqq",
        "gptq-3bit",
        "gptq-marlin",
        "gptq-int16",
        "nvfp4",
        "w8a8",
        "activations",
        "per-tensor",
        "frozen",
        "sparse",
    ],
)
def test_refused(quantization, message):
    with pytest.raises(ConfigError, match=message):
        parse_quantization_config({"quantization_config": quantization}, "m/config.json")


# ---------------------------------------------------------------------------------------------
# a quantized module's tensors in a checkpoint


def test_module_of():
    assert module_of("model.layers.0.mlp.experts.3.up_proj.weight") == "model.layers.0.mlp.experts.3.up_proj"
    assert module_of("model.layers.0.self_attn.q_proj.bias") is None


def forms(tensors):
    return {t.suffix: (t.forms, t.required) for t in tensors}


def test_packed_tensors_gptq():
    # a [96, 64] weight (N outputs, K inputs), 4 bits in groups of 32: 8 codes an int32 word
    got = forms(packed_tensors("gptq", WeightQuant(4, 32, False, True), (96, 64), "m"))
    assert got["qweight"] == ((((8, 96), ("I32",)),), True)
    assert got["qzeros"] == ((((2, 12), ("I32",)),), True)
    assert got["scales"] == ((((2, 96), ("F16", "BF16")),), True)
    assert got["g_idx"] == ((((64,), ("I32", "I64")),), False)
    # 8-bit per channel symmetric: moeinf's int8 layout, float32 scales readable too
    got = forms(packed_tensors("gptq", WeightQuant(8, None, True, False), (96, 64), "m"))
    assert got["qweight"][0] == (((16, 96), ("I32",)),) and got["scales"][0] == (((1, 96), ("F16", "BF16", "F32")),)
    with pytest.raises(TensorShapeError, match="m: expected its 96 inputs to be a multiple of group_size 64"):
        packed_tensors("gptq", WeightQuant(4, 64, True, False), (32, 96), "m")
    with pytest.raises(TensorShapeError, match="m: GPTQ packs 8 4-bit codes.*its 36 outputs"):
        packed_tensors("gptq", WeightQuant(4, 32, True, False), (36, 64), "m")


def test_packed_tensors_compressed_tensors():
    got = forms(packed_tensors("compressed-tensors", WeightQuant(4, 32, False, False), (36, 64), "m"))
    assert got["weight_packed"] == ((((36, 8), ("I32",)),), True)
    assert got["weight_scale"] == ((((36, 2), ("F16", "BF16")),), True)
    assert got["weight_shape"] == ((((2,), ("I32", "I64")),), True)
    # zeros packed along the 36 outputs (5 words), or one int8 each as before compressed-tensors 0.10
    assert got["weight_zero_point"] == ((((5, 2), ("I32",)), ((36, 2), ("I8", "I32"))), True)
    channel = forms(packed_tensors("compressed-tensors", WeightQuant(8, None, True, False), (36, 64), "m"))
    assert channel["weight_scale"][0] == (((36, 1), ("F16", "BF16", "F32")), ((36,), ("F16", "BF16", "F32")))
    assert channel["weight_zero_point"][1] is False  # symmetric: none needed


def test_unpack_module():
    ref = random_gptq(32, 64, bits=4, group_size=32, sym=False, desc_act=True, seed=9)
    tensors = pack_gptq(ref.codes, ref.zeros, ref.scales, ref.g_idx, bits=4, checkpoint_format="gptq_v2")
    scheme = parse_quantization_config({"quantization_config": GPTQ_V2_ASYM})
    packed = unpack_module(scheme, WeightQuant(4, 32, False, True), tensors, (32, 64), "m")
    assert packed.perm is not None and torch.equal(dequantize_packed(packed), ref.weight)
    assert scatters_groups(ref.g_idx, 32) and not scatters_groups(torch.arange(64, dtype=torch.int32) // 32, 32)
    assert not scatters_groups(torch.zeros(64, dtype=torch.int32), None)
    with pytest.raises(TensorShapeError, match=r"m: expected a weight of shape \[32, 32\], found \[32, 64\]"):
        unpack_module(scheme, WeightQuant(4, 32, False, True), tensors, (32, 32), "m")


def test_unpack_module_checks_weight_shape():
    pytest.importorskip("compressed_tensors")
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    scheme = ct_scheme(4, 32, symmetric=True)
    state = ct_compress(weight, scheme)
    ct = parse_quantization_config({"quantization_config": QWEN3_MOE_W4A16})
    packed = unpack_module(ct, WeightQuant(4, 32, True, False), state, (16, 64), "m")
    assert torch.equal(dequantize_packed(packed), ct_decompress(state, scheme, torch.float32))
    with pytest.raises(TensorShapeError, match=r"m: expected weight_shape to hold \[16, 60\], found \[16, 64\]"):
        unpack_module(ct, WeightQuant(4, 32, True, False), state, (16, 60), "m")
