"""Quantized weights for tests, written from each format's definition rather than with moeinf's
readers: a GPTQ packer (AutoGPTQ's pack loops), random GPTQ weights with the float weights they
stand for, and compressed-tensors' own compressor for pack-quantized weights.

Tiny quantized checkpoints: save_tiny_gptq and save_tiny_compressed_tensors write a tiny model of
a family (tests/checkpoints.py) with its linear layers quantized as GPTQModel / AutoGPTQ and
llm-compressor save them (config.json's quantization_config included), the attention and MLP
projections packed and the routers, embeddings, norms and lm head left as they are; both return
the exact float weights the packed ones stand for. oracle_weights dequantizes a quantized folder
with the oracles (quant_formats.dequantize_gptq, compressed-tensors' decompressor) and
dequantized_copy writes those weights out as a float checkpoint, for transformers to load.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch


class GPTQWeight(NamedTuple):
    codes: torch.Tensor  # [N, K] int64 in 0..2^bits - 1
    zeros: torch.Tensor  # [N, K / G] int64 in 0..2^bits - 1
    scales: torch.Tensor  # [N, K / G] float16 / bfloat16
    g_idx: torch.Tensor  # [K] int32: the group of each input
    weight: torch.Tensor  # [N, K] float32: W[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g], g = g_idx[k]


def random_gptq(
    rows: int,
    cols: int,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> GPTQWeight:
    """Random integer codes, zeros (the midpoint when sym) and scales, and the exact float weights
    they define. desc_act shuffles which inputs form each group, as GPTQ's act order does: input
    order[i] lands in group i // G for a random permutation `order`."""
    gen = torch.Generator().manual_seed(seed)
    group = cols if group_size == -1 else group_size
    groups = cols // group
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    if sym:
        zeros = torch.full((rows, groups), 1 << (bits - 1), dtype=torch.int64)
    else:
        zeros = torch.randint(0, 1 << bits, (rows, groups), generator=gen)
    scales = (torch.rand(rows, groups, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    g_idx = torch.arange(cols) // group
    if desc_act:
        order = torch.randperm(cols, generator=gen)
        g_idx = torch.empty(cols, dtype=torch.int64)
        g_idx[order] = torch.arange(cols) // group
    # float64 holds the product of a <= 8-bit integer and a 16-bit float exactly, so does float32
    weight = (codes - zeros[:, g_idx]).to(torch.float64) * scales[:, g_idx].to(torch.float64)
    return GPTQWeight(codes, zeros, scales, g_idx.to(torch.int32), weight.to(torch.float32))


def pack_gptq(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """codes [N, K], zeros and scales [N, K / G] -> the tensors of a GPTQ linear, packed as AutoGPTQ's
    QuantLinear.pack does: qweight [K * bits / 32, N] with input (32 / bits) * r + j in bits
    [bits * j, bits * (j + 1)) of row r, qzeros [K / G, N * bits / 32] likewise along N, holding
    zero - 1 in the v1 format ("gptq"), masked to `bits` bits (AutoGPTQ's own packer let a zero of 0
    overflow into its neighbours; a clean v1 writer stores 2^bits - 1, which its reader decodes
    back to 0), and zero itself in "gptq_v2"."""
    per = 32 // bits
    mask = (1 << bits) - 1
    intweight = codes.T.numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << np.uint32(bits * j)
    stored = zeros.T.numpy().astype(np.int64)  # [K / G, N]
    if checkpoint_format == "gptq":
        stored = (stored - 1) & mask
    stored = stored.astype(np.uint32)
    qzeros = np.zeros((stored.shape[0], stored.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= stored[:, col * per + j] << np.uint32(bits * j)
    out = {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": scales.T.contiguous(),
    }
    if g_idx is not None:
        out["g_idx"] = g_idx.to(torch.int32)
    return out


def ct_scheme(bits: int, group_size: int | None, symmetric: bool, actorder: Any = None):
    """A compressed-tensors weight-only int scheme (W4A16 / W8A16 style) for Linear modules."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="group" if group_size else "channel",
        group_size=group_size,
        actorder=actorder,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def ct_compress(weight: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """A float weight [N, K] quantized with min-max scales (compressed-tensors' calculate_qparams)
    and packed by compressed-tensors' PackedQuantizationCompressor, as llm-compressor saves it."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    if args.group_size:
        grouped = weight.reshape(weight.shape[0], -1, args.group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
    else:
        low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    scale, zero_point = calculate_qparams(low, high, args)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    return PackedQuantizationCompressor.compress(state, scheme)


def ct_decompress(state: dict[str, torch.Tensor], scheme, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """compressed-tensors' own decompressor; scale_dtype recasts weight_scale first (float32: the
    products come out unrounded)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    if scale_dtype is not None:
        state = {**state, "weight_scale": state["weight_scale"].to(scale_dtype)}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


# ---------------------------------------------------------------------------------------------
# GPTQ's quantizer


def gptq_quantize(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    order: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> GPTQWeight:
    """W [N, K] -> GPTQ's codes, zeros and scales by its min-max quantizer (GPTQ's
    Quantizer.find_params: the range stretched to hold 0, sym: [-max|W|, max|W|] with zero
    2^(bits - 1); scale (max - min) / (2^bits - 1)), rounded to nearest without GPTQ's error
    feedback. order [K] (desc_act): input order[i] lands in group i // G, as GPTQ's act order
    puts the inputs of largest Hessian diagonal first; None: in order. group_size -1: one group."""
    rows, cols = weight.shape
    maxq = (1 << bits) - 1
    group = cols if group_size == -1 else group_size
    g_idx = torch.arange(cols) // group
    if order is not None:
        g_idx = torch.empty(cols, dtype=torch.int64)
        g_idx[order] = torch.arange(cols) // group
    perm = torch.argsort(g_idx, stable=True)  # group g's inputs at perm[g G: (g + 1) G]
    w = weight.to(torch.float32)[:, perm].reshape(rows, cols // group, group)
    xmin, xmax = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
    scales = ((xmax - xmin) / maxq).to(scale_dtype)
    scale32 = scales.to(torch.float32)
    if sym:
        zeros = torch.full((rows, cols // group), 1 << (bits - 1), dtype=torch.int64)
    else:
        zeros = torch.round(-xmin / scale32).clamp(0, maxq).to(torch.int64)
    grouped = torch.clamp(torch.round(w / scale32[..., None]) + zeros[..., None], 0, maxq).to(torch.int64)
    codes = torch.empty(rows, cols, dtype=torch.int64)
    codes[:, perm] = grouped.reshape(rows, cols)
    exact = (codes - zeros[:, g_idx]).to(torch.float64) * scales[:, g_idx].to(torch.float64)
    return GPTQWeight(codes, zeros, scales, g_idx.to(torch.int32), exact.to(torch.float32))


# ---------------------------------------------------------------------------------------------
# tiny quantized checkpoints

# tiny configs whose every linear input is a multiple of 32 (whole groups of 32, and of GPTQ's words)
QUANT_OVERRIDES = {
    "mixtral": {},  # D 64, F 96, q 64, kv 32
    "qwen3_moe": dict(moe_intermediate_size=64, intermediate_size=96),  # q 96 (head_dim 24), kv 48
    "qwen2_moe": dict(moe_intermediate_size=64, intermediate_size=96, shared_expert_intermediate_size=64),
    "olmoe": dict(intermediate_size=64),
    "phimoe": dict(intermediate_size=64),
}
# the linear modules left as they are: embeddings, lm head, routers (Mixtral's block_sparse_moe.gate,
# Qwen's and OLMoE's mlp.gate) and Qwen2-MoE's shared expert gate, as GPTQModel and llm-compressor's
# MoE recipes leave them
KEPT = ("embed_tokens", "lm_head", "gate", "shared_expert_gate")
CT_IGNORE = ["lm_head", r"re:.*\.gate$", "re:.*shared_expert_gate$"]
# modules that read the same input: GPTQ's desc_act orders them alike (one Hessian)
SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gu",
    "up_proj": "gu",
    "w1": "gu",
    "w3": "gu",
}
GPTQ_PACKED = ("qweight", "qzeros", "scales", "g_idx")
CT_PACKED = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def quantized_module(name: str, shape) -> str | None:
    """The module whose weight `name` is, if these checkpoints quantize it."""
    if not name.endswith(".weight") or len(shape) != 2:
        return None
    module = name.removesuffix(".weight")
    return None if module.rsplit(".", 1)[-1] in KEPT else module


def gptq_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    checkpoint_format: str = "gptq",
    writer: str = "gptqmodel",
    dynamic: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """quantization_config as GPTQModel (4.x) or AutoGPTQ (TheBloke's releases: no checkpoint_format,
    which is v1) write it to config.json."""
    if writer == "autogptq":
        assert checkpoint_format == "gptq" and not dynamic, "AutoGPTQ writes v1 zeros and no dynamic rules"
        return {
            "bits": bits, "group_size": group_size, "damp_percent": 0.1, "desc_act": desc_act,
            "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq",
        }  # fmt: skip
    config = {
        "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym, "lm_head": False,
        "quant_method": "gptq", "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
        "meta": {
            "quantizer": ["gptqmodel:4.0.0"], "uri": "https://github.com/modelcloud/gptqmodel", "damp_percent": 0.05,
            "damp_auto_increment": 0.01, "static_groups": False, "true_sequential": True, "mse": 0.0,
        },
    }  # fmt: skip
    if dynamic:
        config["dynamic"] = dynamic
    return config


def gptq_module_params(config: dict[str, Any], module: str) -> dict[str, Any] | None:
    """bits, group_size, sym of `module` under a GPTQ quantization_config: its defaults, overridden
    by the first `dynamic` pattern that re.matches ("-:" leaves the module unquantized: None)."""
    params = {key: config.get(key, default) for key, default in (("bits", 4), ("group_size", -1), ("sym", True))}
    for pattern, overrides in (config.get("dynamic") or {}).items():
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), module):
            return (
                None if pattern.startswith("-:") else {**params, **{k: overrides[k] for k in params if k in overrides}}
            )
    return params


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor], quantization: dict[str, Any] | None) -> None:
    """model.safetensors <- tensors; config.json's quantization_config <- quantization (None: none)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def save_tiny_gptq(
    family: str,
    folder: Path,
    *,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = True,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    writer: str = "gptqmodel",
    dynamic: dict[str, dict] | None = None,
    shared_input_order: bool = True,
    seed: int = 0,
    **overrides,
) -> dict[str, torch.Tensor]:
    """A tiny `family` model (tests/checkpoints.save_tiny, QUANT_OVERRIDES) saved as GPTQModel /
    AutoGPTQ save GPTQ checkpoints: every linear module but KEPT packed by gptq_quantize and
    pack_gptq (qweight, qzeros, scales, g_idx; float16 scales), each as gptq_module_params says
    (dynamic: GPTQModel's per-module rules). desc_act: a random act order per input, shared by the
    modules that read it (SHARED_INPUT) unless not shared_input_order. Returns the exact float32
    weight of each packed module, by weight name."""
    from tests.checkpoints import save_tiny

    save_tiny(family, folder, seed, **{**QUANT_OVERRIDES.get(family, {}), **overrides})
    config = gptq_config(bits, group_size, sym, desc_act, checkpoint_format, writer, dynamic)
    gen = torch.Generator().manual_seed(seed + 1)
    orders: dict[str, torch.Tensor] = {}
    tensors, exact = {}, {}
    for name, tensor in sorted(_read_safetensors(folder).items()):
        module = quantized_module(name, tensor.shape)
        params = None if module is None else gptq_module_params(config, module)
        if params is None:
            tensors[name] = tensor
            continue
        order = None
        if desc_act:
            parent, last = module.rsplit(".", 1)
            key = f"{parent}/{SHARED_INPUT.get(last, last)}" if shared_input_order else module
            if key not in orders:
                orders[key] = torch.randperm(tensor.shape[1], generator=gen)
            order = orders[key]
        ref = gptq_quantize(
            tensor, bits=params["bits"], group_size=params["group_size"], sym=params["sym"], order=order
        )
        packed = pack_gptq(
            ref.codes, ref.zeros, ref.scales, ref.g_idx, bits=params["bits"], checkpoint_format=checkpoint_format
        )
        tensors.update({f"{module}.{key}": value for key, value in packed.items()})
        exact[name] = ref.weight
    _rewrite(folder, tensors, config)
    return exact


def ct_config(scheme, ignore: list[str] = CT_IGNORE) -> dict[str, Any]:
    """quantization_config as llm-compressor writes it: compressed-tensors' QuantizationConfig of
    one config group, serialised by the package."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    scheme = scheme.model_copy(update={"format": "pack-quantized"})
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed", ignore=ignore
    )
    return {**config.model_dump(mode="json"), "version": compressed_tensors.__version__}


def save_tiny_compressed_tensors(
    family: str,
    folder: Path,
    *,
    bits: int = 4,
    group_size: int | None = 32,
    symmetric: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    ignore: list[str] = CT_IGNORE,
    seed: int = 0,
    **overrides,
) -> dict[str, torch.Tensor]:
    """A tiny `family` model saved as llm-compressor saves a W4A16 / W8A16 checkpoint: every linear
    module but KEPT in `dtype` (the checkpoint's; its scales' too) quantized by min-max scales and
    packed by compressed-tensors' own compressor (ct_compress), format pack-quantized. group_size
    None: strategy channel. Returns the exact float32 weight of each packed module (the package's
    decompressor on float32 scales), by weight name."""
    from tests.checkpoints import save_tiny

    save_tiny(family, folder, seed, **{**QUANT_OVERRIDES.get(family, {}), **overrides})
    scheme = ct_scheme(bits, group_size, symmetric)
    tensors, exact = {}, {}
    for name, tensor in sorted(_read_safetensors(folder).items()):
        module = quantized_module(name, tensor.shape)
        if module is None or any(_ct_matches(module, target) for target in ignore):
            tensors[name] = tensor
            continue
        state = ct_compress(tensor.to(dtype), scheme)
        tensors.update({f"{module}.{key}": value for key, value in state.items()})
        exact[name] = ct_decompress(state, scheme, torch.float32)
    _rewrite(folder, tensors, ct_config(scheme, ignore))
    return exact


def _ct_matches(module: str, target: str) -> bool:
    return re.match(target[3:], module) is not None if target.startswith("re:") else module == target


# ---------------------------------------------------------------------------------------------
# the oracle's float weights


def oracle_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every packed module of a quantized folder (as the builders above write them: one
    model.safetensors) dequantized by the oracle, float32 by weight name: GPTQ by
    quant_formats.dequantize_gptq (AutoGPTQ's reference forward, from the definition) with each
    module's gptq_module_params; compressed-tensors by the package's decompressor (one config
    group; float32 scales, so that nothing rounds)."""
    from moeinf.loaders.quant_formats import dequantize_gptq

    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = _read_safetensors(folder)
    weights = {}
    if quantization["quant_method"] == "gptq":
        fmt = quantization.get("checkpoint_format", "gptq")
        for module in (name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")):
            params = gptq_module_params(quantization, module)
            parts = {key: tensors[f"{module}.{key}"] for key in GPTQ_PACKED if f"{module}.{key}" in tensors}
            weights[f"{module}.weight"] = dequantize_gptq(
                **parts, bits=params["bits"], group_size=params["group_size"], checkpoint_format=fmt, name=module
            )
        return weights
    from compressed_tensors.quantization import QuantizationScheme

    (group,) = quantization["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    for module in (name.removesuffix(".weight_packed") for name in tensors if name.endswith(".weight_packed")):
        state = {key: tensors[f"{module}.{key}"] for key in CT_PACKED if f"{module}.{key}" in tensors}
        weights[f"{module}.weight"] = ct_decompress(state, scheme, torch.float32)
    return weights


def dequantized_copy(quantized_folder: Path, float_folder: Path) -> dict[str, torch.Tensor]:
    """Writes quantized_folder as a float checkpoint at float_folder: each packed module's weight
    dequantized by oracle_weights (float32), every other tensor copied, config.json less its
    quantization_config, the other files (generation_config.json, a tokenizer) copied. transformers'
    AutoModelForCausalLM loads it as any float checkpoint. Returns the dequantized weights."""
    quantized_folder, float_folder = Path(quantized_folder), Path(float_folder)
    float_folder.mkdir(parents=True, exist_ok=True)
    weights = oracle_weights(quantized_folder)
    packed = {f"{name.removesuffix('.weight')}.{key}" for name in weights for key in GPTQ_PACKED + CT_PACKED}
    tensors = {name: t for name, t in _read_safetensors(quantized_folder).items() if name not in packed}
    for file in quantized_folder.iterdir():
        if file.is_file() and file.name not in ("model.safetensors", "config.json"):
            shutil.copy(file, float_folder / file.name)
    shutil.copy(quantized_folder / "config.json", float_folder / "config.json")
    _rewrite(float_folder, {**tensors, **weights}, None)
    return weights
