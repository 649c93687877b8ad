"""A Hugging Face checkpoint folder, opened and checked: config -> spec, tensors -> index.

Opening checks every tensor the model reads against the shape the spec expects, so a bad
checkpoint fails before any weight is loaded.

Quantized checkpoints. FP8 and MXFP4 weights are dequantized as they are read. GPTQ and
compressed-tensors (pack-quantized) ones hold some linear modules packed (loaders/quant_formats.py
says which tensors, and how a module is found to be quantized); opening checks those tensors'
shapes and dtypes instead of the module's float weight. Such a checkpoint is read two ways:
  - dequantized, exactly, to float32: `read` (the dense layers) and `expert_weights`, as from any
    float checkpoint;
  - the routed experts kept packed: `native_expert_format` (the ExpertFormat they are in) and
    `packed_expert` (one expert as two QuantizedMatrix, kernels/quantize.py's layout, unpacked by
    moving bits, never requantized).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from moeinf.errors import ConfigError, MissingTensorError, TensorDtypeError, TensorShapeError
from moeinf.kernels.fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_fp8, scale_shape
from moeinf.kernels.mxfp4 import dequantize_mxfp4
from moeinf.kernels.quantize import GROUP_QUANTUM, INT4_SYMMETRIC_ZERO, INT8_CODE_OFFSET, QuantizedMatrix
from moeinf.loaders.expert_format import ExpertFormat
from moeinf.loaders.quant_formats import (
    G_IDX,
    MARKERS,
    SCALES,
    TENSORS,
    PackedWeight,
    QuantScheme,
    WeightQuant,
    dequantize_packed,
    module_of,
    packed_tensors,
    parse_quantization_config,
    scatters_groups,
    unpack_module,
)
from moeinf.loaders.safetensors_index import DTYPES, TensorIndex
from moeinf.models.family import EXPERT_ROLES, INT_QUANT_ROLES, Family
from moeinf.models.registry import spec_from_config
from moeinf.models.spec import ModelSpec


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"expected {path.name} in {path.parent}, found no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class ExpertWeights(NamedTuple):
    """One routed expert in the slot layout, in the checkpoint's dtype (float32 where it is
    quantized: FP8, MXFP4, GPTQ, compressed-tensors), on the CPU."""

    w13: torch.Tensor  # [2F, D]: gate rows, then up rows
    w2: torch.Tensor  # [D, F]: down
    b13: torch.Tensor | None  # [2F]: gate then up biases (GPT-OSS); None without biases
    b2: torch.Tensor | None  # [D]


class PackedExpert(NamedTuple):
    """One routed expert of a GPTQ / compressed-tensors checkpoint as it is packed, in
    kernels/quantize.py's layout (int8 per channel, int8 grouped, or int4 in groups), on the CPU:

        w13         QuantizedMatrix [2F, D]   gate rows then up rows, each set reordered by down's
                                              act-order perm p2 (rows move with their scales and
                                              zeros); columns W13[:, input_perm]
        w2          QuantizedMatrix [D, F]    W2[:, p2]: its columns in act-order
        input_perm  int64 [D] or None         the order w13's columns take the input in; None:
                                              identity (an expert without act order)

    With [g; u] = dequantize(w13) @ x[input_perm] and a = silu(g) * u, the expert's output is
    dequantize(w2) @ a: a comes out in w2's column order, so nothing is gathered between the two.
    Both matrices share the format, group size, symmetry and scale dtype; an asymmetric format
    has a zero array in both even where a matrix's zeros all happen to be the midpoint."""

    w13: QuantizedMatrix
    w2: QuantizedMatrix
    input_perm: torch.Tensor | None

    @property
    def expert_format(self) -> ExpertFormat:
        """The ExpertFormat of this expert's matrices; input_perm is this expert's own (an expert
        without one goes into a format with input_perm too, as the identity order)."""
        matrix = self.w2
        if matrix.format == "int8" and not matrix.grouped_int8:
            return ExpertFormat("int8", input_perm=self.input_perm is not None)
        group = matrix.group_size
        if matrix.format == "int8" and (self.w13.group_size, group) == (self.w13.shape[-1], matrix.shape[-1]):
            group = None  # one group a row in both matrices: grouped int8 per output channel
        return ExpertFormat(
            matrix.format,
            group_size=group,
            symmetric=matrix.symmetric,
            scale_dtype=matrix.scale_dtype,
            input_perm=self.input_perm is not None,
        )


class _Layout(NamedTuple):
    """How one packed weight comes out of quant_formats: what its records' format is made of."""

    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    scale_dtype: torch.dtype  # of the layout: float32 for int8 per channel, else the checkpoint's


LAYOUT_FIELDS = {"bits": "bits", "group_size": "group size", "symmetric": "symmetry", "scale_dtype": "scale dtype"}
REQUANTIZE = (
    "pass expert_dtype='int8' or 'int4' to requantize the experts from their exact dequantized weights, or a "
    "float expert_dtype to dequantize them"
)


@dataclass
class Checkpoint:
    path: Path
    family: Family
    spec: ModelSpec
    index: TensorIndex
    scheme: QuantScheme | None = None  # GPTQ / compressed-tensors quantization_config; None: neither
    # native_expert_format's scan of the experts, once: (format, or the problem that leaves none)
    _native: tuple[ExpertFormat | None, str | None] | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"expected a checkpoint folder (config.json, *.safetensors), found no folder at {path}")
        config = read_json(path / "config.json")
        generation = path / "generation_config.json"
        if generation.exists():
            # generation_config.json has the last word on which tokens end a sequence
            gen = read_json(generation)
            config = {**config, **{k: gen[k] for k in ("eos_token_id", "bos_token_id") if gen.get(k) is not None}}
        source = str(path / "config.json")
        # first, so that AWQ, GGUF, bitsandbytes... are refused saying why (quant_formats.WHY_NOT)
        scheme = parse_quantization_config(config, source)
        family, spec = spec_from_config(config, source)
        index = TensorIndex.open(path)
        check_tensors(family, spec, index, scheme)
        return cls(path, family, spec, index, scheme)

    def read(self, role: str, layer: int | None = None, expert: int | None = None) -> torch.Tensor:
        """A tensor by role; `layer` is the decoder layer. FP8 weights and GPTQ / compressed-tensors
        packed ones come back dequantized (float32, exactly)."""
        packed = self.packed_weight(role, layer, expert)
        if packed is not None:
            return dequantize_packed(packed)
        name = self.family.tensor_name(role, layer, expert)
        tensor = self.index.read(name)
        if tensor.dtype == torch.float8_e4m3fn:
            return dequantize_fp8(tensor, self.index.read(name + SCALE_SUFFIX), self.spec.quant_block)
        return tensor

    def read_expert(self, role: str, moe_layer: int, expert: int) -> torch.Tensor:
        """An expert tensor; `moe_layer` counts MoE layers only, as the expert stack does."""
        return self.read(role, self.spec.moe_layers[moe_layer], expert)

    def expert_weights(self, moe_layer: int, expert: int) -> ExpertWeights:
        """One routed expert, from per-expert tensors or from one row of the fused ones."""
        if not self.family.fused_experts:
            gate, up, down = (self.read_expert(role, moe_layer, expert) for role in EXPERT_ROLES)
            return ExpertWeights(torch.cat([gate, up]), down, None, None)
        layer = self.spec.moe_layers[moe_layer]

        def row(role: str) -> torch.Tensor:
            return self.index.read_row(self.family.tensor_name(role, layer), expert)

        if self.spec.quantization == "mxfp4":
            gate_up = dequantize_mxfp4(row("experts_gate_up_blocks"), row("experts_gate_up_scales")).T  # [D, 2F]
            w2 = dequantize_mxfp4(row("experts_down_blocks"), row("experts_down_scales"))  # [D, F]
        else:
            gate_up = row("experts_gate_up")  # [D, 2F]
            w2 = row("experts_down").T  # [F, D] -> [D, F]
        # gate and up interleaved: columns 2i gate, 2i+1 up
        w13 = torch.cat([gate_up[:, 0::2].T, gate_up[:, 1::2].T])  # [2F, D]
        if not self.spec.expert_bias:
            return ExpertWeights(w13, w2, None, None)
        b = row("experts_gate_up_bias")  # [2F] interleaved as gate_up's columns
        return ExpertWeights(w13, w2, torch.cat([b[0::2], b[1::2]]), row("experts_down_bias"))

    def quant_of(self, name: str) -> WeightQuant | None:
        """How weight tensor `name` is quantized, when the checkpoint holds it packed (GPTQ /
        compressed-tensors); None: it is stored as it is."""
        return quant_of(self.scheme, self.index, name)

    def packed_weight(self, role: str, layer: int | None = None, expert: int | None = None) -> PackedWeight | None:
        """A GPTQ / compressed-tensors packed weight in moeinf's packed layout (quant_formats.py),
        or None where the checkpoint holds the role's tensor as it is."""
        name = self.family.tensor_name(role, layer, expert)
        quant = self.quant_of(name)
        if quant is None:
            return None
        module = module_of(name)
        tensors = {}
        for suffix in TENSORS[self.scheme.method]:
            if f"{module}.{suffix}" in self.index:
                tensors[suffix] = self.index.read(f"{module}.{suffix}")
        return unpack_module(self.scheme, quant, tensors, self.family.tensor_shape(self.spec, role), module)

    def _layout(self, name: str, quant: WeightQuant) -> _Layout:
        if quant.bits == 8 and quant.group_size is None and quant.symmetric:
            scale_dtype = torch.float32  # the int8 layout's scales (16-bit ones widened exactly)
        else:
            scale_dtype = DTYPES[self.index.info(f"{module_of(name)}.{SCALES[self.scheme.method]}").dtype]
        return _Layout(quant.bits, quant.group_size, quant.symmetric, scale_dtype)

    def _record_format(self, layout: _Layout, input_perm: bool) -> tuple[ExpertFormat | None, str | None]:
        """The ExpertFormat of experts packed as `layout`, or the reason there is none: 8-bit
        symmetric per channel -> int8 (float32 scales); other 8-bit (groups, zero points) ->
        grouped int8 with the checkpoint's scale dtype, group_size None for one scale per output
        channel (and for groups as wide as both hidden_size and the experts' intermediate size,
        the same records); int4 per channel: groups of gcd(D, F), each channel's scale repeated."""
        hidden, ffn = self.spec.hidden_size, self.spec.expert_ffn
        if layout.bits == 8:
            if layout.group_size is None and layout.symmetric:
                return ExpertFormat("int8", input_perm=input_perm), None
            group = layout.group_size
            widths = (hidden, ffn) if group is None else (group,)
            if any(w % GROUP_QUANTUM for w in widths) or (group is not None and (hidden % group or ffn % group)):
                grouping = f"groups of {group}" if group else "one scale per output channel"
                return None, (
                    f"{self.path}: the routed experts are 8-bit in {grouping}, expected groups a multiple of "
                    f"{GROUP_QUANTUM} dividing hidden_size {hidden} and the experts' intermediate size {ffn} (the "
                    "grouped int8 records' groups, one a row included); " + REQUANTIZE
                )
            if group == hidden == ffn:
                group = None  # one group a row of both matrices: what packed_expert's matrices say
            fmt = ExpertFormat(
                "int8", group_size=group, symmetric=layout.symmetric, scale_dtype=layout.scale_dtype,
                input_perm=input_perm,
            )  # fmt: skip
            return fmt, None
        group = layout.group_size or math.gcd(hidden, ffn)
        if group % GROUP_QUANTUM or hidden % group or ffn % group:
            return None, (
                f"{self.path}: the routed experts are 4-bit in groups of {group}, expected a multiple of "
                f"{GROUP_QUANTUM} dividing hidden_size {hidden} and the experts' intermediate size {ffn} (the int4 "
                "records' groups); " + REQUANTIZE
            )
        return (
            ExpertFormat(
                "int4",
                group_size=group,
                symmetric=layout.symmetric,
                scale_dtype=layout.scale_dtype,
                input_perm=input_perm,
            ),
            None,
        )

    def _differing(self, layouts: dict[str, _Layout], what: str) -> str | None:
        """None when every layout is the same; else which fields differ, with a weight of each."""
        (first_name, first), *rest = layouts.items()
        found = []
        for key, label in LAYOUT_FIELDS.items():
            other = next(((n, lay) for n, lay in rest if getattr(lay, key) != getattr(first, key)), None)
            if other is not None:
                found.append(
                    f"{label} {_show(getattr(first, key))} ({first_name}) and {_show(getattr(other[1], key))} "
                    f"({other[0]})"
                )
        if not found:
            return None
        return (
            f"{self.path}: {what} must share bits, group size, symmetry and scale dtype to be packed in one record "
            f"format, found " + "; ".join(found) + "; " + REQUANTIZE
        )

    def _scan_experts(self) -> tuple[ExpertFormat | None, str | None]:
        if self.scheme is None or self.family.fused_experts:
            return None, None
        layouts: dict[str, _Layout] = {}
        plain: list[str] = []
        input_perm = False
        for layer in self.spec.moe_layers:
            for expert in range(self.spec.num_experts):
                for role in EXPERT_ROLES:
                    name = self.family.tensor_name(role, layer, expert)
                    quant = self.quant_of(name)
                    if quant is None:
                        plain.append(name)
                        continue
                    layouts[name] = self._layout(name, quant)
                    if role != "expert_down" and quant.act_order and not input_perm:
                        g_idx = f"{module_of(name)}.{G_IDX[self.scheme.method]}"
                        input_perm = g_idx in self.index and scatters_groups(self.index.read(g_idx), quant.group_size)
        if not layouts:
            return None, None
        if plain:
            return None, (
                f"{self.path}: {len(layouts)} of the routed experts' weights are quantized and {len(plain)} are not "
                f"(e.g. {next(iter(layouts))} is, {plain[0]} is not), expected all or none for their records to "
                "share a format; " + REQUANTIZE
            )
        problem = self._differing(layouts, "the routed experts' gate, up and down weights")
        if problem:
            return None, problem
        return self._record_format(next(iter(layouts.values())), input_perm)

    def native_expert_format(self) -> ExpertFormat | None:
        """The ExpertFormat of the routed experts as the checkpoint packs them (GPTQ / compressed-
        tensors), which packed_expert returns them in; None for a float checkpoint (FP8 and MXFP4
        included: they are dequantized) or one whose experts are not quantized.

        Every expert's gate, up and down must share bits, group size, symmetry and scale dtype;
        input_perm is set when some expert's gate / up has act order with a permutation that is
        not the identity. ConfigError, telling to pass expert_dtype int8 / int4 (requantize) or a
        float one (dequantize): mixed formats, some experts quantized and some not, or a layout the
        runtime has no records for (groups, int4 or 8-bit, that are no multiple of 32 dividing the
        hidden and intermediate sizes). 8-bit with groups or zero points (quant_formats' "int8
        grouped") is the grouped int8 format. Only this method raises these:
        `read` and `expert_weights` dequantize such checkpoints all the same."""
        if self._native is None:
            self._native = self._scan_experts()  # reads every expert's header, and act-order g_idx
        fmt, problem = self._native
        if problem:
            raise ConfigError(problem)
        return fmt

    def packed_expert(self, moe_layer: int, expert: int) -> PackedExpert:
        """One routed expert as the checkpoint packs it (PackedExpert), moved bit for bit into
        kernels/quantize.py's layout: down's act-order perm folded into w13's rows, gate's and
        up's (which must agree) given as input_perm. ConfigError where the expert is not
        quantized, its weights' layouts differ, gate's and up's input orders differ, or its
        layout is none of the records' (see native_expert_format)."""
        layer = self.spec.moe_layers[moe_layer]
        where = f"{self.path}: expert {expert} of MoE layer {moe_layer} (decoder layer {layer})"
        names = {role: self.family.tensor_name(role, layer, expert) for role in EXPERT_ROLES}
        quants = {role: self.quant_of(name) for role, name in names.items()}
        for role, quant in quants.items():
            if quant is None:
                raise ConfigError(
                    f"{where}: expected its gate, up and down weights packed (GPTQ / compressed-tensors) to keep it "
                    f"as it is, found {names[role]} stored as a float tensor; read it with expert_weights"
                )
        layouts = {names[role]: self._layout(names[role], quants[role]) for role in EXPERT_ROLES}
        problem = self._differing(layouts, f"expert {expert} of MoE layer {moe_layer}'s gate, up and down weights")
        if problem:
            raise ConfigError(problem)
        layout = layouts[names["expert_gate"]]
        fmt, problem = self._record_format(layout, input_perm=False)
        if problem:
            raise ConfigError(problem)
        gate, up, down = (self.packed_weight(role, layer, expert) for role in EXPERT_ROLES)
        for role, packed in zip(EXPERT_ROLES, (gate, up, down)):
            if packed.perm is not None and not quants[role].act_order:
                raise ConfigError(
                    f"{where}: quantization_config says no act order (desc_act / actorder), but "
                    f"{module_of(names[role])}'s g_idx scatters its groups along the inputs; expected g_idx to "
                    "number the inputs' groups in order, or the config to say desc_act true"
                )
        if not _same_perm(gate.perm, up.perm):
            raise ConfigError(
                f"{where}: expected its gate and up weights to take their inputs in one act order (both see the "
                "same hidden state, so GPTQ's desc_act orders them alike), found two different g_idx orders; the "
                "records hold one input order per expert: " + REQUANTIZE
            )
        rows = down.perm  # act in w2's column order: gate's and up's rows reordered alike
        w13 = [_matrix(p, fmt, rows) for p in (gate, up)]
        zero = None if w13[0].zero is None else torch.cat([m.zero for m in w13])
        return PackedExpert(
            QuantizedMatrix(
                w13[0].format,
                torch.cat([m.q for m in w13]),
                torch.cat([m.scale for m in w13]),
                zero,
                w13[0].group_size,
            ),  # fmt: skip
            _matrix(down, fmt, None),
            gate.perm,
        )

    @property
    def tokenizer_file(self) -> Path | None:
        candidate = self.path / "tokenizer.json"
        return candidate if candidate.exists() else None


def _show(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, bool):
        return "symmetric" if value else "asymmetric"
    return "per channel" if value is None else str(value)


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _matrix(packed: PackedWeight, fmt: ExpertFormat, rows: torch.Tensor | None) -> QuantizedMatrix:
    """A packed weight -> a QuantizedMatrix of `fmt` (bits moved, scales copied): its rows reordered
    by `rows` (with their scales and zeros) when given, a per-channel int4 scale repeated over the
    format's groups, the midpoint written out as zeros in an asymmetric format. A grouped int8
    matrix that quant_formats gave per-channel float32 scales (one group a row, all zeros the
    midpoint) gets them back in the format's 16-bit dtype, exactly: they were widened from it."""
    q, scale, zero = packed.q, packed.scale, packed.zero
    if rows is not None:
        q, scale, zero = q[rows], scale[rows], None if zero is None else zero[rows]
    if fmt.kind == "int8" and not fmt.grouped:
        return QuantizedMatrix("int8", q.contiguous(), scale.contiguous())
    if fmt.kind == "int8":
        K = q.shape[1]
        group = fmt.group_size_for(K)
        if scale.dim() == 1:  # float32 [N] per channel, widened from the checkpoint's 16-bit scales
            narrow = scale.to(fmt.scale_dtype)
            if not torch.equal(narrow.to(torch.float32), scale):
                raise ConfigError(
                    f"expected the per-channel scales of an 8-bit weight to be {fmt.scale_dtype} values as the "
                    f"checkpoint's other scales are, found float32 ones that are not"
                )
            scale = narrow[:, None].expand(-1, K // group)
            zero = None
        if zero is None and not fmt.symmetric:
            zero = torch.full(scale.shape, INT8_CODE_OFFSET, dtype=torch.uint8)
        zero = None if zero is None else zero.contiguous()
        return QuantizedMatrix("int8", q.contiguous(), scale.contiguous(), zero, group)
    repeat = packed.group_size // fmt.group_size  # > 1 only for one scale per channel: K / G groups of it
    if repeat > 1:
        scale = scale.repeat_interleave(repeat, dim=1)
        zero = None if zero is None else zero.repeat_interleave(repeat, dim=1)
    if zero is None and not fmt.symmetric:
        zero = torch.full(scale.shape, INT4_SYMMETRIC_ZERO, dtype=torch.uint8)
    return QuantizedMatrix(
        "int4", q.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous(), fmt.group_size
    )


def quant_of(scheme: QuantScheme | None, index: TensorIndex, name: str) -> WeightQuant | None:
    """How weight tensor `name` is quantized when the checkpoint holds it packed: no `name`, but
    `<module>.qweight` (gptq) / `<module>.weight_packed` (compressed-tensors). None: not packed.
    ConfigError where the checkpoint holds it packed and the config leaves it unquantized."""
    if scheme is None or name in index:
        return None
    module = module_of(name)
    marker = MARKERS[scheme.method]
    if module is None or f"{module}.{marker}" not in index:
        return None
    quant = scheme.weight_quant(module)
    if quant is None:
        raise ConfigError(
            f"{index.info(f'{module}.{marker}').file.name}: the checkpoint holds {module}.{marker}, a quantized "
            f"module, but its {scheme.method} quantization_config leaves {module} unquantized (dynamic, ignore, "
            "lm_head or modules_in_block_to_quantize); expected the two to agree"
        )
    return quant


def check_packed(scheme: QuantScheme, quant: WeightQuant, index: TensorIndex, module: str, shape: tuple) -> None:
    """A packed module's tensors against what its float weight's shape and quant say."""
    group = "one scale per output channel" if quant.group_size is None else f"groups of {quant.group_size}"
    kind = f"{quant.bits}-bit {scheme.method}, {group}, {'' if quant.symmetric else 'a'}symmetric"
    for tensor in packed_tensors(scheme.method, quant, shape, module):
        name = f"{module}.{tensor.suffix}"
        if name not in index:
            if tensor.required:
                raise MissingTensorError(
                    f"{module}: expected {name} ({tensor.meaning}) beside {module}.{MARKERS[scheme.method]}, a "
                    f"{kind} module, found it in none of the checkpoint's files"
                )
            continue
        info = index.info(name)
        dtypes = [d for s, codes in tensor.forms if info.shape == s for d in codes]
        if not dtypes:
            shapes = " or ".join(str(list(s)) for s, _ in tensor.forms)
            raise TensorShapeError(
                f"{info.file.name}: tensor {name!r} should have shape {shapes} ({tensor.meaning}) for a {kind} "
                f"weight {list(shape)} of this config, found {list(info.shape)}"
            )
        if info.dtype not in dtypes:
            raise TensorDtypeError(
                f"{info.file.name}: tensor {name!r} should be one of {', '.join(dtypes)} ({tensor.meaning}, {kind}), "
                f"found {info.dtype}"
            )


def check_tensors(family: Family, spec: ModelSpec, index: TensorIndex, scheme: QuantScheme | None = None) -> None:
    for name, role in family.expected_roles(spec).items():
        shape, dtypes = family.tensor_shape(spec, role), family.tensor_dtypes(spec, role)
        if role in INT_QUANT_ROLES:
            quant = quant_of(scheme, index, name)
            if quant is not None:
                check_packed(scheme, quant, index, module_of(name), shape)
                continue
        info = index.info(name)
        if info.shape != shape:
            raise TensorShapeError(
                f"{info.file.name}: tensor {name!r} should have shape {list(shape)} for this config, "
                f"found {list(info.shape)}"
            )
        if info.dtype not in dtypes:
            raise TensorDtypeError(
                f"{info.file.name}: tensor {name!r} should be one of {', '.join(dtypes)}, found {info.dtype}"
            )
        if info.dtype == FP8_DTYPE:
            check_fp8_scale(index, name, spec.quant_block)


def check_fp8_scale(index: TensorIndex, name: str, block: tuple[int, int]) -> None:
    """An FP8 weight needs its block scales beside it, one per block."""
    scale = index.info(name + SCALE_SUFFIX)  # MissingTensorError names it when absent
    expected = scale_shape(index.info(name).shape, block)
    if scale.shape != expected:
        raise TensorShapeError(
            f"{scale.file.name}: tensor {scale.name!r} should have shape {list(expected)} (one scale per "
            f"{block[0]}x{block[1]} block of {name}), found {list(scale.shape)}"
        )
    if scale.dtype not in ("F32", "BF16"):
        raise TensorDtypeError(f"{scale.file.name}: tensor {scale.name!r} should be F32 or BF16, found {scale.dtype}")
