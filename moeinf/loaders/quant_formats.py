"""Published integer-quantized checkpoints, read as they are: GPTQ and compressed-tensors
pack-quantized weights unpacked, never requantized, into moeinf's own packed layout.

moeinf's packed layout of a weight W [N, K] (rows are outputs, K the inputs, as a torch Linear
weight); G inputs in a row share a scale (a group), G = K is one scale per output channel:

  int4          q uint8 [N, K / 2]: byte j of row n holds input 2j in its low nibble and 2j + 1 in
                its high nibble, values 0..15; scale [N, K / G] float16 or bfloat16 (the
                checkpoint's own dtype); zero uint8 [N, K / G], or None for 8 (symmetric).
                W[n, k] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]
  int8          per output channel: q int8 [N, K], scale float32 [N], no zero.
                W[n, k] = q[n, k] * scale[n]
  int8 grouped  what GPTQ 8-bit and compressed-tensors W8A16 with groups or zero points need
                (group_size 128 is the common case; per-channel asymmetric 8-bit is this with G = K):
                q int8 [N, K], scale [N, K / G] float16 or bfloat16, zero uint8 [N, K / G] offset by
                128 as q is, or None for 128 (symmetric).
                W[n, k] = (q[n, k] + 128 - zero[n, k // G]) * scale[n, k // G]
                A runtime layout: kernels/quantize.py's grouped int8 (QuantizedMatrix "int8" with a
                group size), the records' ExpertFormat("int8", group_size, symmetric, scale_dtype),
                so the experts are served as they are (Checkpoint.packed_expert).

Both formats store unsigned codes u in 0..2^bits - 1 (compressed-tensors as signed values plus
2^(bits - 1)), so the int4 q is u itself and the int8 q is u - 128, and both zeros are unsigned
codes on the same scale: the unpacking is exact bit moving, the scales are copied untouched.

Activation order. GPTQ's desc_act (and compressed-tensors' actorder "group") stores g_idx [K],
the group of each input, and the inputs of a group lie scattered along K. Unpacking such a
weight returns `perm` [K] with it: what is packed is W[:, perm], whose groups are contiguous (G
consecutive columns each, in group order). Since y = W x = W[:, perm] x[perm], the runtime must
apply the permutation to the input:
  - w13 (input: the hidden state): gather x[..., perm] before the matmul;
  - w2 (input: act = silu(gate) * up, F wide): fold it into w13 instead, reordering w13's gate
    rows and up rows by w2's perm (rows of a packed matrix move with their scales and zeros),
    so that act comes out already in w2's order and nothing is gathered between the two.
Each expert has its own permutations (GPTQ orders by each expert's own Hessian), and gate and up
are quantized separately: their perms agree when their calibration inputs did, which nothing
guarantees; compare them, and gather x once per distinct perm.

In a checkpoint. A quantized linear module `m` (the tensor name of its weight less ".weight")
stores, instead of m.weight, the tensors below (N outputs, K inputs, G the group, K / G groups):

    gptq                 dtype                 shape                          note
    m.qweight            int32                 [K * bits / 32, N]
    m.qzeros             int32                 [K / G, N * bits / 32]
    m.scales             float16 / bfloat16    [K / G, N]
    m.g_idx              int32                 [K]                            optional
    compressed-tensors (pack-quantized)
    m.weight_packed      int32                 [N, ceil(K * bits / 32)]
    m.weight_scale       float16 / bfloat16    [N, K / G] ([N, 1] channel)
    m.weight_shape       int64 / int32         [2]                            holds [N, K]
    m.weight_zero_point  int32 / int8          [ceil(N * bits / 32), K / G]   asymmetric only
                                               / [N, K / G]
    m.weight_g_idx       int32                 [K]                            optional

(float32 scales too where the layout is int8 per channel, which keeps float32 scales). Whether a
module is quantized is what the checkpoint holds: m.qweight (gptq) or m.weight_packed
(compressed-tensors) beside no m.weight; its bits, group size and symmetry are what the scheme's
weight_quant(m) says (a module the checkpoint holds packed but the config leaves unquantized is a
ConfigError). packed_tensors lists what a module must hold, unpack_module unpacks it.

Checks on the tensors' shapes and dtypes raise TensorShapeError / TensorDtypeError; a config that
asks for something moeinf cannot read raises ConfigError. This module only needs torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from moeinf.errors import ConfigError, TensorDtypeError, TensorShapeError

SUPPORTED = (
    "gptq (bits 4 or 8, checkpoint_format gptq or gptq_v2) and compressed-tensors (format pack-quantized: "
    "int weights of 4 or 8 bits, strategy group or channel); fp8 (block) and mxfp4 are read by their own loaders"
)
HANDLED_ELSEWHERE = ("fp8", "mxfp4")  # moeinf/kernels/fp8.py and mxfp4.py, chosen in models/moe_config.py
WHY_NOT = {
    "awq": "AWQ packs its nibbles in another order and stores zeros unlike GPTQ",
    "bitsandbytes": "bitsandbytes NF4 / LLM.int8 weights are not integer codes with a scale per group",
    "gguf": "GGUF files are llama.cpp's own block formats",
}
BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1: zeros stored minus one (AutoGPTQ); v2: stored as they are (GPTQModel)
SCALE_DTYPES = (torch.float16, torch.bfloat16)
# the tensors beside a quantized module `m` (m.qweight, ...): unpack_gptq's and unpack_compressed_tensors'
# arguments; g_idx, weight_zero_point and weight_g_idx may be absent
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
COMPRESSED_TENSORS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


# ---------------------------------------------------------------------------------------------
# quantization_config


@dataclass(frozen=True)
class WeightQuant:
    """How one module's weight is quantized."""

    bits: int  # 4 or 8
    group_size: int | None  # inputs per scale; None: one scale per output channel
    symmetric: bool  # zero is the midpoint (8, 128): GPTQ sym, compressed-tensors symmetric
    act_order: bool  # a g_idx tensor may scatter the groups along K (GPTQ desc_act, CT actorder "group")


@dataclass(frozen=True)
class QuantScheme:
    """A checkpoint's quantization_config, checked.

    method: "gptq" or "compressed-tensors"; checkpoint_format: "gptq" (v1: zeros stored minus one),
    "gptq_v2" or "pack-quantized".

    gptq: `default` applies to every module GPTQ quantized, except those `dynamic` (GPTQModel's
    per-module rules, first re.match wins; None: left unquantized) overrides, and lm_head unless
    `lm_head`; `block_modules` (modules_in_block_to_quantize) narrows them when given. A config
    cannot tell which modules GPTQ touched at all (routers and embeddings never are): the
    checkpoint does, by holding `<module>.qweight`; weight_quant gives that module's parameters.

    compressed-tensors: `targets` (target, weights) in config order, a target repeated by a later
    group taking that group's weights, and `ignore`, matched as compressed-tensors does: a target
    is a module name, "re:<regex>" (re.match) or a class name, of which only "Linear" matches
    (every module moeinf asks about is a linear projection); exact names win over regexes over
    "Linear", and among those the alphabetically first, as compressed_tensors.utils.match_targets
    orders them.
    """

    method: str
    checkpoint_format: str
    default: WeightQuant | None = None
    dynamic: tuple[tuple[str, WeightQuant | None], ...] = ()
    lm_head: bool = False
    block_modules: tuple[str, ...] | None = None
    targets: tuple[tuple[str, WeightQuant], ...] = ()
    ignore: tuple[str, ...] = ()

    def weight_quant(self, module: str) -> WeightQuant | None:
        """How `module` (a checkpoint module name, e.g. model.layers.0.mlp.experts.3.gate_proj) is
        quantized; None: it is not."""
        if self.method == "gptq":
            for pattern, weights in self.dynamic:
                if re.match(pattern, module):
                    return weights
            if not self.lm_head and (module == "lm_head" or module.endswith(".lm_head")):
                return None
            if self.block_modules is not None and not any(
                module == m or module.endswith("." + m) for m in self.block_modules
            ):
                return None
            return self.default
        if any(_target_matches(module, target) for target in self.ignore):
            return None
        by_target = dict(self.targets)  # a later group's repeated target replaces the earlier one
        order = sorted(by_target, key=lambda t: (t.startswith("re:"), t))
        named = [t for t in order if _name_matches(module, t)]
        classes = [t for t in order if t == "Linear" and t not in named]
        matched = named + classes
        return by_target[matched[0]] if matched else None


def _name_matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def _target_matches(module: str, target: str) -> bool:
    return _name_matches(module, target) or target == "Linear"


def parse_quantization_config(config: dict[str, Any], source: str = "config.json") -> QuantScheme | None:
    """config.json's quantization_config -> the scheme of a GPTQ or compressed-tensors checkpoint.

    None: no quantization_config, or fp8 / mxfp4, which models/moe_config.py and the fp8 / mxfp4
    kernels already read. Any other method, or a GPTQ / compressed-tensors variant moeinf cannot
    read as it is, raises ConfigError naming it and what is supported.
    """
    quantization = config.get("quantization_config")
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        raise ConfigError(
            f"{source}: expected quantization_config to be a JSON object, found {type(quantization).__name__}"
        )
    method = quantization.get("quant_method")
    if not isinstance(method, str):
        raise ConfigError(f"{source}: expected quantization_config quant_method to name a method, found {method!r}")
    method = method.lower()
    if method in HANDLED_ELSEWHERE:
        return None
    if method == "gptq":
        return _parse_gptq(quantization, source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(quantization, source)
    why = WHY_NOT.get(method)
    raise ConfigError(
        f"{source}: quantization_config quant_method {method!r} is not supported"
        + (f" ({why})" if why else "")
        + f"; expected {SUPPORTED}"
    )


def _bits(value: Any, what: str) -> int:
    if value not in BITS or isinstance(value, bool):
        raise ConfigError(f"{what}: expected bits 4 or 8, found {value!r}")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: expected true or false, found {value!r}")
    return value


def _gptq_weights(block: dict[str, Any], base: WeightQuant | None, what: str) -> WeightQuant:
    """GPTQ's bits / group_size / sym / desc_act, each falling back to `base` when given."""
    bits = _bits(block.get("bits") if "bits" in block or base is None else base.bits, what)
    if "group_size" in block or base is None:
        group = block.get("group_size", -1)
        if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
            raise ConfigError(f"{what}: expected group_size -1 (per channel) or a positive integer, found {group!r}")
        group_size = None if group == -1 else group
    else:
        group_size = base.group_size
    sym = _flag(block.get("sym", True if base is None else base.symmetric), f"{what} sym")
    desc_act = _flag(block.get("desc_act", False if base is None else base.act_order), f"{what} desc_act")
    pack_dtype = block.get("pack_dtype", "int32")
    if pack_dtype != "int32":
        raise ConfigError(f"{what}: expected pack_dtype 'int32' (codes packed in int32 words), found {pack_dtype!r}")
    return WeightQuant(bits, group_size, sym, desc_act)


def _parse_gptq(q: dict[str, Any], source: str) -> QuantScheme:
    what = f"{source}: quantization_config (gptq)"
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in GPTQ_FORMATS:
        raise ConfigError(
            f"{what}: expected checkpoint_format 'gptq' or 'gptq_v2', found {fmt!r} (repacked kernel layouts such as "
            "marlin or bitblas are not read)"
        )
    if q.get("is_marlin_format"):
        raise ConfigError(f"{what}: expected is_marlin_format false, found true (Marlin-repacked weights are not read)")
    default = _gptq_weights(q, None, what)
    dynamic = q.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ConfigError(f"{what}: expected dynamic to map module patterns to overrides, found {dynamic!r}")
    rules: list[tuple[str, WeightQuant | None]] = []
    for pattern, overrides in dynamic.items():
        if pattern.startswith("-:"):
            rules.append((pattern[2:], None))
            continue
        if not isinstance(overrides, dict):
            raise ConfigError(f"{what}: expected dynamic[{pattern!r}] to be an object, found {overrides!r}")
        rules.append((pattern.removeprefix("+:"), _gptq_weights(overrides, default, f"{what} dynamic[{pattern!r}]")))
    block = q.get("modules_in_block_to_quantize")
    if block is not None:
        if not (isinstance(block, list) and all(isinstance(b, list) for b in block)):
            raise ConfigError(f"{what}: expected modules_in_block_to_quantize to be a list of lists, found {block!r}")
        block = tuple(name for names in block for name in names)
    return QuantScheme(
        method="gptq",
        checkpoint_format=fmt,
        default=default,
        dynamic=tuple(rules),
        lm_head=_flag(q.get("lm_head", False), f"{what} lm_head"),
        block_modules=block,
    )


ACTORDER_GROUP = ("group", "dynamic")  # g_idx stored (compressed-tensors aliases "dynamic" to "group")
ACTORDER_NONE = (None, False, "weight", "static")  # reordering only while quantizing: groups stay contiguous


def _ct_weights(weights: Any, what: str) -> WeightQuant:
    if not isinstance(weights, dict):
        raise ConfigError(f"{what}: expected weights to be an object (weight-only int quantization), found {weights!r}")
    if weights.get("type", "int") != "int":
        raise ConfigError(f"{what}: expected weights type 'int', found {weights.get('type')!r}")
    bits = _bits(weights.get("num_bits", 8), f"{what} weights num_bits")
    group = weights.get("group_size")
    strategy = weights.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if group is None else "group" if isinstance(group, int) and group > 0 else "channel"
    if strategy == "group":
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
            raise ConfigError(f"{what}: expected a positive group_size with strategy 'group', found {group!r}")
        group_size = group
    elif strategy == "channel":
        group_size = None
    else:
        raise ConfigError(f"{what}: expected weights strategy 'group' or 'channel', found {strategy!r}")
    if weights.get("dynamic", False) not in (False, None):
        raise ConfigError(f"{what}: expected static weights (dynamic false), found dynamic {weights.get('dynamic')!r}")
    actorder = weights.get("actorder")
    if actorder is True or actorder in ACTORDER_GROUP:
        act_order = True
    elif actorder in ACTORDER_NONE:
        act_order = False
    else:
        raise ConfigError(f"{what}: expected actorder null, 'weight' or 'group', found {actorder!r}")
    return WeightQuant(bits, group_size, _flag(weights.get("symmetric", True), f"{what} symmetric"), act_order)


def _parse_compressed_tensors(q: dict[str, Any], source: str) -> QuantScheme:
    what = f"{source}: quantization_config (compressed-tensors)"
    fmt = q.get("format")
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{what}: expected quantization_status 'compressed' (packed weights), found {status!r}")
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if q.get(key):
            raise ConfigError(f"{what}: expected no {key}, found {q[key]!r} (only weight quantization is read)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{what}: expected config_groups to map group names to schemes, found {groups!r}")
    targets: list[tuple[str, WeightQuant]] = []
    for name, group in groups.items():
        where = f"{what} config_groups[{name!r}]"
        if not isinstance(group, dict):
            raise ConfigError(f"{where}: expected an object, found {group!r}")
        group_format = group.get("format") or fmt
        if group_format != "pack-quantized":
            raise ConfigError(
                f"{where}: expected format 'pack-quantized' (int weights packed in int32), found {group_format!r}"
            )
        for key in ("input_activations", "output_activations"):
            if group.get(key) is not None:
                raise ConfigError(
                    f"{where}: expected {key} null (weight-only quantization such as W4A16 / W8A16), found "
                    f"{group[key]!r}"
                )
        weights = _ct_weights(group.get("weights"), where)
        names = group.get("targets")
        if not (isinstance(names, list) and names and all(isinstance(t, str) for t in names)):
            raise ConfigError(f"{where}: expected targets to list module names or patterns, found {names!r}")
        targets += [(t, weights) for t in names]
    ignore = q.get("ignore") or []
    if not (isinstance(ignore, list) and all(isinstance(t, str) for t in ignore)):
        raise ConfigError(f"{what}: expected ignore to list module names or patterns, found {ignore!r}")
    return QuantScheme(
        method="compressed-tensors", checkpoint_format="pack-quantized", targets=tuple(targets), ignore=tuple(ignore)
    )


# ---------------------------------------------------------------------------------------------
# the tensors of a quantized module, in a checkpoint

WEIGHT_SUFFIX = ".weight"
MARKERS = {"gptq": "qweight", "compressed-tensors": "weight_packed"}  # what a quantized module holds
TENSORS = {"gptq": GPTQ_TENSORS, "compressed-tensors": COMPRESSED_TENSORS}
G_IDX = {"gptq": "g_idx", "compressed-tensors": "weight_g_idx"}
SCALES = {"gptq": "scales", "compressed-tensors": "weight_scale"}
_SCALE_CODES = ("F16", "BF16")


def module_of(weight_name: str) -> str | None:
    """model.layers.0.self_attn.q_proj.weight -> model.layers.0.self_attn.q_proj; None for a name
    that is not a module's weight."""
    return weight_name[: -len(WEIGHT_SUFFIX)] if weight_name.endswith(WEIGHT_SUFFIX) else None


def scale_dtype_codes(quant: WeightQuant) -> tuple[str, ...]:
    """The safetensors dtypes a module's scales may have: float16 / bfloat16, which moeinf's layout
    keeps, and float32 too where that layout is int8 per channel (float32 scales, the 16-bit ones
    widened exactly)."""
    if quant.bits == 8 and quant.group_size is None and quant.symmetric:
        return _SCALE_CODES + ("F32",)
    return _SCALE_CODES


@dataclass(frozen=True)
class PackedTensor:
    """One tensor `<module>.<suffix>` a quantized module must (required) or may hold: one of
    `forms`, each a (shape, safetensors dtypes) pair."""

    suffix: str
    forms: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]
    required: bool
    meaning: str  # for messages: what the tensor holds


def packed_tensors(method: str, quant: WeightQuant, shape: tuple[int, int], module: str) -> tuple[PackedTensor, ...]:
    """What quantized `module` (float weight [N, K] = shape) holds under `method` (the table of the
    module docstring). A shape the format cannot pack (K / G or the 32-bit words not whole) raises
    TensorShapeError naming the module."""
    rows, cols = shape
    bits, per = quant.bits, 32 // quant.bits
    group = cols if quant.group_size is None else quant.group_size
    if cols % group:
        raise TensorShapeError(
            f"{module}: expected its {cols} inputs to be a multiple of group_size {group} (whole groups only), "
            f"found {cols} % {group} = {cols % group}"
        )
    groups = cols // group
    scales = scale_dtype_codes(quant)
    index = (("I32", "I64"),)
    if method == "gptq":
        for what, dim in (("inputs", cols), ("outputs", rows)):
            if dim % per:
                raise TensorShapeError(
                    f"{module}: GPTQ packs {per} {bits}-bit codes per int32 word; expected its {dim} {what} to be a "
                    f"multiple of {per}, found {dim}"
                )
        return (
            PackedTensor("qweight", (((cols // per, rows), ("I32",)),), True, f"{per} codes a word along the inputs"),
            PackedTensor("qzeros", (((groups, rows // per), ("I32",)),), True, f"{per} zeros a word along the outputs"),
            PackedTensor("scales", (((groups, rows), scales),), True, f"one scale per group of {group} and output"),
            PackedTensor("g_idx", (((cols,), *index),), False, "the group of each input"),
        )
    if method != "compressed-tensors":
        raise ConfigError(f"{module}: expected a method among {', '.join(MARKERS)}, found {method!r}")
    words = -(-cols // per)
    scale_shapes = [((rows, groups), scales)] + ([((rows,), scales)] if quant.group_size is None else [])
    return (
        PackedTensor("weight_packed", (((rows, words), ("I32",)),), True, f"{per} codes a word along the inputs"),
        PackedTensor("weight_scale", tuple(scale_shapes), True, f"one scale per group of {group} and output"),
        PackedTensor("weight_shape", (((2,), *index),), True, "[N, K]"),
        PackedTensor(
            "weight_zero_point",
            (((-(-rows // per), groups), ("I32",)), ((rows, groups), ("I8", "I32"))),
            not quant.symmetric,
            "the zeros, packed along the outputs or one int8 each",
        ),
        PackedTensor("weight_g_idx", (((cols,), *index),), False, "the group of each input"),
    )


def unpack_module(
    scheme: QuantScheme,
    quant: WeightQuant,
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, int],
    module: str,
) -> PackedWeight:
    """A quantized module's tensors (by suffix, those it holds) -> moeinf's packed layout of its
    weight [N, K] = shape, unpacked by unpack_gptq or unpack_compressed_tensors. An optional g_idx
    is honoured whatever the config says (a trivial one gives no perm)."""
    if scheme.method == "gptq":
        packed = unpack_gptq(
            tensors["qweight"],
            tensors["qzeros"],
            tensors["scales"],
            tensors.get("g_idx"),
            bits=quant.bits,
            group_size=-1 if quant.group_size is None else quant.group_size,
            sym=quant.symmetric,
            checkpoint_format=scheme.checkpoint_format,
            name=module,
        )
    else:
        stored = [int(d) for d in tensors["weight_shape"].tolist()]
        if stored != list(shape):
            raise TensorShapeError(f"{module}: expected weight_shape to hold {list(shape)}, found {stored}")
        packed = unpack_compressed_tensors(
            tensors["weight_packed"],
            tensors["weight_scale"],
            shape,
            tensors.get("weight_zero_point"),
            tensors.get("weight_g_idx"),
            bits=quant.bits,
            group_size=quant.group_size,
            symmetric=quant.symmetric,
            name=module,
        )
    if packed.shape != tuple(shape):
        raise TensorShapeError(f"{module}: expected a weight of shape {list(shape)}, found {list(packed.shape)}")
    return packed


def scatters_groups(g_idx: torch.Tensor, group_size: int | None) -> bool:
    """Whether g_idx [K] scatters the groups along K (act order), i.e. unpacking gives a perm."""
    inputs = g_idx.shape[0]
    group = inputs if group_size is None else group_size
    return not torch.equal(g_idx.to(torch.int64), torch.arange(inputs) // group)


# ---------------------------------------------------------------------------------------------
# the packed layout


@dataclass(frozen=True)
class PackedWeight:
    """A weight in moeinf's packed layout (module docstring); it packs W[:, perm], not W, when
    perm is given."""

    bits: int  # 4: q uint8 [N, K / 2] nibbles; 8: q int8 [N, K]
    q: torch.Tensor
    scale: torch.Tensor  # [N, K / G] float16 / bfloat16; int8 per channel without zero: [N] float32
    zero: torch.Tensor | None  # uint8 [N, K / G]; None: the midpoint (8, 128)
    group_size: int  # G, = K when there is one scale per output channel
    perm: torch.Tensor | None = None  # int64 [K]: the packed matrix is W[:, perm]; None: W itself

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.q.shape
        return rows, cols * 2 if self.bits == 4 else cols


def dequantize_packed(packed: PackedWeight, input_order: bool = True) -> torch.Tensor:
    """moeinf's packed layout -> float32 W [N, K]; with input_order False, W[:, perm] as packed.

    Exact: (q - zero) is an integer of at most 8 bits and the scale a float16 / bfloat16, so their
    product is a float32 without rounding (a float32 scale rounds it once, correctly)."""
    rows, cols = packed.shape
    if packed.bits == 4:
        codes = torch.stack([packed.q & 0x0F, packed.q >> 4], dim=-1).reshape(rows, cols).to(torch.int32)
    else:
        codes = packed.q.to(torch.int32) + 128
    mid = 1 << (packed.bits - 1)
    scale = packed.scale.to(torch.float32)
    if scale.dim() == 1:
        scale = scale[:, None]
    scale = scale.repeat_interleave(packed.group_size, dim=1) if scale.shape[1] > 1 else scale
    zero = mid if packed.zero is None else packed.zero.to(torch.int32).repeat_interleave(packed.group_size, dim=1)
    weight = (codes - zero).to(torch.float32) * scale
    if not input_order or packed.perm is None:
        return weight
    out = torch.empty_like(weight)
    out[:, packed.perm] = weight
    return out


def _unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words [R, C] -> their 32 / bits codes along `dim` (code j of a word in bits [bits * j,
    bits * (j + 1))), int32 in 0..2^bits - 1: [R * 32 / bits, C] or [R, C * 32 / bits]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if dim == 0:
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R, per, C]
        return codes.reshape(words.shape[0] * per, words.shape[1])
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [R, C, per]
    return codes.reshape(words.shape[0], words.shape[1] * per)


def _group_order(g_idx: torch.Tensor | None, inputs: int, group: int, name: str) -> torch.Tensor | None:
    """The permutation that makes g_idx's groups contiguous; None when they already are."""
    if g_idx is None:
        return None
    if g_idx.shape != (inputs,) or g_idx.dtype not in (torch.int32, torch.int64):
        raise TensorShapeError(
            f"{name}: expected g_idx int32 [{inputs}] (the group of each input), found {g_idx.dtype} {list(g_idx.shape)}"
        )
    groups = inputs // group
    g = g_idx.to(torch.int64)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise TensorShapeError(
            f"{name}: expected g_idx values in 0..{groups - 1}, found {int(g.min())}..{int(g.max())}"
        )
    if torch.equal(g, torch.arange(inputs) // group):
        return None
    counts = torch.bincount(g, minlength=groups)
    if bool((counts != group).any()):
        bad = int(torch.nonzero(counts != group)[0])
        raise TensorShapeError(
            f"{name}: expected g_idx to give each of the {groups} groups {group} inputs, found group {bad} with "
            f"{int(counts[bad])}"
        )
    return torch.argsort(g, stable=True)


def _to_layout(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group: int,
    perm: torch.Tensor | None,
    name: str,
) -> PackedWeight:
    """Unsigned codes [N, K] int32, scale [N, K / G] (checkpoint dtype), unsigned zeros [N, K / G]
    int32 or None -> moeinf's packed layout of codes[:, perm]."""
    rows, cols = codes.shape
    if perm is not None:
        codes = codes[:, perm]
    mid = 1 << (bits - 1)
    if zero is not None and bool((zero == mid).all()):
        zero = None
    if zero is not None:
        zero = zero.to(torch.uint8).contiguous()
    if bits == 8 and group == cols and zero is None:  # int8 per output channel
        return PackedWeight(8, (codes - mid).to(torch.int8), scale.reshape(rows).to(torch.float32), None, cols)
    if scale.dtype not in SCALE_DTYPES:
        raise TensorDtypeError(
            f"{name}: expected float16 or bfloat16 scales (moeinf's int{bits} layout with groups keeps the "
            f"checkpoint's scale dtype), found {scale.dtype}"
        )
    scale = scale.contiguous()
    if bits == 8:
        return PackedWeight(8, (codes - mid).to(torch.int8), scale, zero, group, perm)
    if cols % 2:
        raise TensorShapeError(f"{name}: expected an even number of inputs for int4, found {cols}")
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return PackedWeight(4, q, scale, zero, group, perm)


def _check_bits(bits: int) -> int:
    if bits not in BITS or isinstance(bits, bool):
        raise ConfigError(f"expected bits 4 or 8, found {bits!r}")
    return bits


def _check_int32(tensor: torch.Tensor, what: str, name: str) -> None:
    if tensor.dtype != torch.int32 or tensor.dim() != 2:
        raise TensorDtypeError(
            f"{name}: expected {what} to be a 2-D int32 tensor, found {tensor.dtype} {list(tensor.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# GPTQ


@dataclass(frozen=True)
class _GPTQShape:
    inputs: int
    outputs: int
    group: int
    per: int


def _gptq_shape(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    checkpoint_format: str,
    name: str,
) -> _GPTQShape:
    _check_bits(bits)
    if checkpoint_format not in GPTQ_FORMATS:
        raise ConfigError(f"{name}: expected checkpoint_format 'gptq' or 'gptq_v2', found {checkpoint_format!r}")
    _check_int32(qweight, "qweight", name)
    _check_int32(qzeros, "qzeros", name)
    per = 32 // bits
    inputs, outputs = qweight.shape[0] * per, qweight.shape[1]
    group = inputs if group_size == -1 else group_size
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ConfigError(f"{name}: expected group_size -1 or a positive integer, found {group_size!r}")
    if inputs % group:
        raise TensorShapeError(
            f"{name}: expected the {inputs} inputs to be a multiple of group_size {group} (moeinf's layout has whole "
            "groups only)"
        )
    groups = inputs // group
    if scales.shape != (groups, outputs):
        raise TensorShapeError(
            f"{name}: expected scales [{groups}, {outputs}] (one per group of {group} inputs and output), found "
            f"{list(scales.shape)}"
        )
    if not scales.dtype.is_floating_point:
        raise TensorDtypeError(f"{name}: expected float16 or bfloat16 scales, found {scales.dtype}")
    if outputs % per or qzeros.shape != (groups, outputs // per):
        raise TensorShapeError(
            f"{name}: expected qzeros [{groups}, {outputs // per}] ({per} {bits}-bit zeros per int32 along the "
            f"{outputs} outputs), found {list(qzeros.shape)}"
        )
    return _GPTQShape(inputs, outputs, group, per)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    sym: bool | None = None,
    checkpoint_format: str = "gptq",
    name: str = "gptq weight",
) -> PackedWeight:
    """A GPTQ linear's tensors -> moeinf's packed layout, without requantizing.

    qweight int32 [K * bits / 32, N]: input k = (32 / bits) * r + j of output n in bits [bits * j,
    bits * (j + 1)) of qweight[r, n]; qzeros int32 [K / G, N * bits / 32], packed the same way
    along N; scales [K / G, N]; g_idx int32 [K] or None (then k // G); group_size -1: per channel.
    checkpoint_format "gptq" (v1) stores each zero minus one, decoded as (stored + 1) mod 2^bits;
    "gptq_v2" stores it as is. sym True checks that every zero is the midpoint, which catches a
    v1 / v2 mix-up (config says the format, the zeros would be off by one). Zeros that are all the
    midpoint come back as None; with desc_act the result packs W[:, perm] (module docstring).
    """
    shape = _gptq_shape(qweight, qzeros, scales, bits, group_size, checkpoint_format, name)
    codes = _unpack_words(qweight, bits, dim=0).T  # [N, K]
    zeros = _unpack_words(qzeros, bits, dim=1)  # [K / G, N]
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    mid = 1 << (bits - 1)
    if sym and not bool((zeros == mid).all()):
        found = int(zeros[zeros != mid][0])
        raise ConfigError(
            f"{name}: the config says sym with checkpoint_format {checkpoint_format!r}, so every zero should decode "
            f"to {mid}, found {found}"
            + (" (is the checkpoint_format the other one?)" if found in (mid - 1, mid + 1) else "")
        )
    perm = _group_order(g_idx, shape.inputs, shape.group, name)
    return _to_layout(codes, scales.T, zeros.T, bits, shape.group, perm, name)


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
    name: str = "gptq weight",
) -> torch.Tensor:
    """A GPTQ linear's tensors -> float32 W [N, K], straight from the definition (AutoGPTQ's
    reference forward: W[:, k] = scales[g] * (q[k] - zeros[g]) with g = g_idx[k], zeros of the v1
    format decoded as (stored + 1) & (2^bits - 1)). The oracle of unpack_gptq: it shares no code
    with it beyond the shape checks."""
    shape = _gptq_shape(qweight, qzeros, scales, bits, group_size, checkpoint_format, name)
    mask = (1 << bits) - 1
    k = torch.arange(shape.inputs)
    n = torch.arange(shape.outputs)
    q = (qweight[k // shape.per, :] >> (bits * (k % shape.per)).to(torch.int32)[:, None]) & mask  # [K, N]
    g = k // shape.group if g_idx is None else g_idx.to(torch.int64)
    z = (qzeros[g][:, n // shape.per] >> (bits * (n % shape.per)).to(torch.int32)[None, :]) & mask  # [K, N]
    if checkpoint_format == "gptq":
        z = (z + 1) & mask
    return (scales[g].to(torch.float32) * (q - z).to(torch.float32)).T.contiguous()


# ---------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized


def unpack_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shape: torch.Tensor | tuple[int, int],
    weight_zero_point: torch.Tensor | None = None,
    weight_g_idx: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    name: str = "pack-quantized weight",
) -> PackedWeight:
    """A compressed-tensors pack-quantized linear -> moeinf's packed layout, without requantizing.

    weight_packed int32 [N, ceil(K * bits / 32)]: input i of a row in bits [bits * i mod 32, ...)
    of word i * bits // 32, stored as its signed value plus 2^(bits - 1); weight_shape [N, K];
    weight_scale [N, K / G] (group_size G) or [N, 1] (group_size None: channel). Asymmetric
    weights carry weight_zero_point, signed zeros packed the same way along N: int32
    [ceil(N * bits / 32), K / G] (compressed-tensors >= 0.10, PR #296), or as int8 [N, K / G]
    unpacked (earlier releases). weight_g_idx int32 [K] (actorder "group", no longer written by
    compressed-tensors 0.20) scatters the groups: the result then packs W[:, perm].
    """
    _check_bits(bits)
    _check_int32(weight_packed, "weight_packed", name)
    dims = [int(d) for d in (weight_shape.tolist() if isinstance(weight_shape, torch.Tensor) else weight_shape)]
    if len(dims) != 2:
        raise TensorShapeError(f"{name}: expected weight_shape to hold [N, K], found {dims}")
    rows, cols = dims
    per = 32 // bits
    words = -(-cols // per)
    if weight_packed.shape != (rows, words):
        raise TensorShapeError(
            f"{name}: expected weight_packed [{rows}, {words}] ({per} {bits}-bit codes per int32 along the {cols} "
            f"inputs of weight_shape {dims}), found {list(weight_packed.shape)}"
        )
    group = cols if group_size is None else group_size
    if cols % group:
        raise TensorShapeError(f"{name}: expected the {cols} inputs to be a multiple of group_size {group}")
    groups = cols // group
    if group_size is None and weight_scale.shape == (rows,):
        weight_scale = weight_scale[:, None]
    if weight_scale.shape != (rows, groups):
        raise TensorShapeError(
            f"{name}: expected weight_scale [{rows}, {groups}] for "
            + (f"groups of {group} inputs" if group_size else "one scale per output channel")
            + f", found {list(weight_scale.shape)}"
        )
    if not weight_scale.dtype.is_floating_point:
        raise TensorDtypeError(f"{name}: expected a float weight_scale, found {weight_scale.dtype}")
    mid = 1 << (bits - 1)
    codes = _unpack_words(weight_packed, bits, dim=1)[:, :cols]
    zero = None
    if weight_zero_point is not None:
        zero = _ct_zeros(weight_zero_point, bits, rows, groups, name)
        if symmetric and not bool((zero == mid).all()):
            raise ConfigError(
                f"{name}: the config says symmetric, so weight_zero_point should be 0 everywhere, found "
                f"{int(zero[zero != mid][0]) - mid}"
            )
    elif not symmetric:
        raise TensorShapeError(f"{name}: expected a weight_zero_point beside an asymmetric weight, found none")
    perm = _group_order(weight_g_idx, cols, group, name)
    return _to_layout(codes, weight_scale, zero, bits, group, perm, name)


def _ct_zeros(zero_point: torch.Tensor, bits: int, rows: int, groups: int, name: str) -> torch.Tensor:
    """weight_zero_point -> unsigned zeros [N, K / G] int32 (signed value + 2^(bits - 1))."""
    mid = 1 << (bits - 1)
    packed_rows = -(-rows * bits // 32)
    if zero_point.dtype == torch.int32 and zero_point.shape == (packed_rows, groups):
        return _unpack_words(zero_point, bits, dim=0)[:rows]
    if zero_point.dtype in (torch.int8, torch.int32) and zero_point.shape == (rows, groups):
        return zero_point.to(torch.int32) + mid
    raise TensorShapeError(
        f"{name}: expected weight_zero_point int32 [{packed_rows}, {groups}] (packed along the {rows} outputs) or "
        f"int8 [{rows}, {groups}], found {zero_point.dtype} {list(zero_point.shape)}"
    )
