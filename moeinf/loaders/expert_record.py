"""One routed expert as a record: the bytes the expert store keeps per (layer, expert), and that the
host tier and the device slots hold unchanged, so that a load is one copy and every kernel reads a
record where it sits (record_views).

A record is a sequence of fields, laid end to end from byte 0, then zero padding up to
record_nbytes (a multiple of ALIGN, so records start on O_DIRECT boundaries). The fields by the
record's ExpertFormat (loaders/expert_format.py; G the group size, D the hidden size, F the
expert's FFN width):

    float   w13          dtype     [2F, D]       gate rows, then up rows
            w2           dtype     [D, F]        down
            b13, b2      dtype     [2F], [D]     expert biases (GPT-OSS), when the family has them
    int8    w13.q        int8      [2F, D]       W = q * scale (kernels/quantize.py's layout)
            w13.scale    float32   [2F]
            w2.q         int8      [D, F]
            w2.scale     float32   [D]
    int8    w13.q        int8      [2F, D]       grouped (a scale_dtype): W = (q + 128 - zero) * scale
            w13.scale    16-bit    [2F, D / G]   float16 or bfloat16 (the format's scale_dtype)
            w13.zero     uint8     [2F, D / G]   only when not symmetric (offset by 128 as q is)
            w2.q         int8      [D, F]
            w2.scale     16-bit    [D, F / G]
            w2.zero      uint8     [D, F / G]
    int4    w13.q        uint8     [2F, D / 2]   two inputs a byte: even input low nibble
            w13.scale    16-bit    [2F, D / G]   float16 or bfloat16 (the format's scale_dtype)
            w13.zero     uint8     [2F, D / G]   only when not symmetric
            w2.q         uint8     [D, F / 2]
            w2.scale     16-bit    [D, F / G]
            w2.zero      uint8     [D, F / G]
    int8 / int4 with input_perm: then input_perm int32 [D], w13's input order (w13 @ x[input_perm])

Float fields are packed tight (a float record's bytes are those of the weights, as store version 2
had them); the fields of a quantized record each start on a FIELD_ALIGN boundary (a cache line),
so that every array view is aligned for the 16-lane loads of the host kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from moeinf.errors import ConfigError, StoreError
from moeinf.kernels.quantize import QuantizedMatrix, quantize_int4, quantize_int8, quantize_int8_grouped
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_format import ExpertFormat

ALIGN = 4096  # records start and end on this boundary (O_DIRECT)
FIELD_ALIGN = 64  # fields of a quantized record start on this boundary


def round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class RecordField:
    name: str  # w13, w2, b13, b2, w13.q, w13.scale, w13.zero, w2.q, ..., input_perm
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the record's start

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class RecordLayout:
    format: ExpertFormat
    w13_shape: tuple[int, int]  # (2F, D) of the float matrix: gate rows, then up rows
    w2_shape: tuple[int, int]  # (D, F)
    fields: tuple[RecordField, ...]
    payload_nbytes: int  # the end of the last field
    record_nbytes: int  # payload rounded up to ALIGN

    @classmethod
    def of(cls, hidden_size: int, expert_ffn: int, dtype: torch.dtype, biases: bool = False) -> RecordLayout:
        """The float record of `dtype`."""
        return cls.for_format(hidden_size, expert_ffn, ExpertFormat.float(dtype), biases)

    @classmethod
    def for_format(cls, hidden_size: int, expert_ffn: int, fmt: ExpertFormat, biases: bool = False) -> RecordLayout:
        D, F = hidden_size, expert_ffn
        if fmt.kind == "float":
            specs = [("w13", fmt.dtype, (2 * F, D)), ("w2", fmt.dtype, (D, F))]
            if biases:
                specs += [("b13", fmt.dtype, (2 * F,)), ("b2", fmt.dtype, (D,))]
            align = 1
        else:
            if biases:
                raise ConfigError(
                    f"expert format {fmt.name}: quantized experts carry no biases; this family's experts have "
                    "them (GPT-OSS): use a float expert_dtype"
                )
            specs = _matrix_fields("w13", fmt, 2 * F, D) + _matrix_fields("w2", fmt, D, F)
            if fmt.input_perm:
                specs.append(("input_perm", torch.int32, (D,)))
            align = FIELD_ALIGN
        fields, offset = [], 0
        for name, dtype, shape in specs:
            offset = round_up(offset, align)
            fields.append(RecordField(name, dtype, shape, offset))
            offset += fields[-1].nbytes
        return cls(fmt, (2 * F, D), (D, F), tuple(fields), offset, round_up(offset))

    def field(self, name: str) -> RecordField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    @property
    def dtype(self) -> torch.dtype | None:
        """The float dtype of a float record's weights; None for a quantized one."""
        return self.format.dtype

    @property
    def biases(self) -> bool:
        return self.has("b13")

    @property
    def quantized(self) -> bool:
        return self.format.quantized


def _matrix_fields(name: str, fmt: ExpertFormat, rows: int, inputs: int) -> list[tuple]:
    """The fields of one quantized matrix [rows, inputs] (the module docstring's table)."""
    if not fmt.grouped:  # int8 per output channel
        return [(f"{name}.q", torch.int8, (rows, inputs)), (f"{name}.scale", torch.float32, (rows,))]
    group = fmt.group_size_for(inputs)
    if inputs % group or inputs % 2:
        raise ConfigError(
            f"expert format {fmt.name}: expected the group size {group} to divide the {inputs} inputs of {name} "
            f"[{rows}, {inputs}] (choose another {fmt.kind} group size)"
        )
    groups = (rows, inputs // group)
    q = (
        (f"{name}.q", torch.int8, (rows, inputs))
        if fmt.kind == "int8"
        else (f"{name}.q", torch.uint8, (rows, inputs // 2))
    )
    fields = [q, (f"{name}.scale", fmt.scale_dtype, groups)]
    if not fmt.symmetric:
        fields.append((f"{name}.zero", torch.uint8, groups))
    return fields


# ---------------------------------------------------------------------------------- views


class ExpertViews(NamedTuple):
    """Records [N, record_nbytes] seen as the kernels' slot-indexed weights: float tensors, or
    QuantizedMatrix for quantized records; each a strided view into the records."""

    w13: torch.Tensor | QuantizedMatrix  # [N, 2F, D]
    w2: torch.Tensor | QuantizedMatrix  # [N, D, F]
    b13: torch.Tensor | None = None  # [N, 2F]
    b2: torch.Tensor | None = None  # [N, D]
    input_perm: torch.Tensor | None = None  # [N, D] int32


def _field_view(records: torch.Tensor, field: RecordField) -> torch.Tensor:
    """records [N, R] uint8 -> field [N, *shape] in its dtype, a view (strides in elements)."""
    N, R = records.shape
    size = field.dtype.itemsize
    if R % size or field.offset % size:
        raise StoreError(
            f"record field {field.name}: offset {field.offset} and record size {R} must be multiples of {size}"
        )
    flat = records.view(-1).view(field.dtype)
    inner = tuple(int(np.prod(field.shape[i + 1 :], dtype=np.int64)) for i in range(len(field.shape)))
    return flat.as_strided((N, *field.shape), (R // size, *inner), field.offset // size)


def record_views(records: torch.Tensor, layout: RecordLayout) -> ExpertViews:
    """records: [N, record_nbytes] uint8 (host or device), each row a record of `layout` -> its
    weights as ExpertViews, strided views sharing the records' memory."""
    if records.dim() != 2 or records.dtype != torch.uint8 or records.shape[1] != layout.record_nbytes:
        raise StoreError(
            f"record views: expected uint8 records [N, {layout.record_nbytes}], found {records.dtype} "
            f"{list(records.shape)}"
        )
    view = {f.name: _field_view(records, f) for f in layout.fields}
    if not layout.quantized:
        return ExpertViews(view["w13"], view["w2"], view.get("b13"), view.get("b2"))
    fmt = layout.format

    def matrix(name: str, inputs: int) -> QuantizedMatrix:
        group = fmt.group_size_for(inputs) if fmt.grouped else None
        return QuantizedMatrix(fmt.kind, view[f"{name}.q"], view[f"{name}.scale"], view.get(f"{name}.zero"), group)

    D, F = layout.w2_shape
    return ExpertViews(matrix("w13", D), matrix("w2", F), input_perm=view.get("input_perm"))


# ---------------------------------------------------------------------------------- packing


class QuantizedExpert(NamedTuple):
    """One expert in a quantized format, ready to be written into a record."""

    w13: QuantizedMatrix  # [2F, D]
    w2: QuantizedMatrix  # [D, F]
    input_perm: torch.Tensor | None = None  # [D] int64: w13 packs W13[:, input_perm]


def quantize_expert(w13: torch.Tensor, w2: torch.Tensor, fmt: ExpertFormat) -> QuantizedExpert:
    """Round-to-nearest (kernels/quantize.py) of a float expert w13 [2F, D], w2 [D, F] into fmt."""
    if not fmt.grouped:
        return QuantizedExpert(quantize_int8(w13), quantize_int8(w2))
    quantize = quantize_int8_grouped if fmt.kind == "int8" else quantize_int4
    options = dict(symmetric=fmt.symmetric, scale_dtype=fmt.scale_dtype)
    return QuantizedExpert(
        quantize(w13, fmt.group_size_for(w13.shape[-1]), **options),
        quantize(w2, fmt.group_size_for(w2.shape[-1]), **options),
    )


def write_fields(layout: RecordLayout, arrays: dict[str, torch.Tensor], out: np.ndarray) -> None:
    """Writes each field's array (its shape, converted to its dtype) at its offset of out (the
    payload; padding between quantized fields is zeroed)."""
    names = {field.name for field in layout.fields}
    if set(arrays) != names:
        raise StoreError(
            f"expert format {layout.format.name}: expected the record fields {sorted(names)}, found arrays for "
            f"{sorted(arrays)}"
        )
    if layout.quantized:
        out[: layout.payload_nbytes] = 0
    for field in layout.fields:
        array = arrays[field.name]
        if tuple(array.shape) != field.shape:
            raise StoreError(
                f"record field {field.name}: expected shape {list(field.shape)}, found {list(array.shape)}"
            )
        data = array.to(field.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        out[field.offset : field.offset + data.nbytes] = data


def quantized_arrays(expert: QuantizedExpert) -> dict[str, torch.Tensor]:
    """A QuantizedExpert's arrays by record field name."""
    arrays = {}
    for name, m in (("w13", expert.w13), ("w2", expert.w2)):
        arrays[f"{name}.q"], arrays[f"{name}.scale"] = m.q, m.scale
        if m.zero is not None:
            arrays[f"{name}.zero"] = m.zero
    if expert.input_perm is not None:
        arrays["input_perm"] = expert.input_perm
    return arrays


def keeps_native_format(checkpoint: Checkpoint, fmt: ExpertFormat) -> bool:
    """Whether records in `fmt` hold the checkpoint's experts as it packs them (GPTQ, compressed-
    tensors in that very format): moved bit for bit, never requantized."""
    if not fmt.quantized or checkpoint.scheme is None:
        return False
    try:
        return checkpoint.native_expert_format() == fmt
    except ConfigError:  # a packing with no records of its own (mixed, odd groups): requantized or dequantized
        return False


def pack_record(checkpoint: Checkpoint, layout: RecordLayout, layer: int, expert: int, out: np.ndarray) -> None:
    """Writes the payload of record (layer, expert) into out[:payload_nbytes]; `layer` counts MoE
    layers only (the store holds no dense layers). Float records convert the checkpoint's weights
    to their dtype; quantized ones take the checkpoint's packed experts as they are where the
    format is its own (keeps_native_format), else quantize the (dequantized) weights round to
    nearest."""
    if keeps_native_format(checkpoint, layout.format):
        write_fields(layout, quantized_arrays(native_expert(checkpoint, layout, layer, expert)), out)
        return
    weights = checkpoint.expert_weights(layer, expert)
    w13, w2 = weights.w13, weights.w2  # [2F, D], [D, F]
    if tuple(w13.shape) != layout.w13_shape or tuple(w2.shape) != layout.w2_shape:
        raise StoreError(
            f"layer {layer}, expert {expert}: expected w13 {list(layout.w13_shape)} and w2 {list(layout.w2_shape)}, "
            f"found {list(w13.shape)} and {list(w2.shape)}"
        )
    if (weights.b13 is not None) != layout.biases:
        raise StoreError(
            f"layer {layer}, expert {expert}: expected {'biases' if layout.biases else 'no biases'} in the record, "
            f"found {'none' if weights.b13 is None else 'biases'} in the checkpoint"
        )
    if layout.quantized:
        arrays = quantized_arrays(quantize_expert(w13, w2, layout.format))
    else:
        arrays = {"w13": w13, "w2": w2}
        if layout.biases:
            arrays |= {"b13": weights.b13, "b2": weights.b2}
    write_fields(layout, arrays, out)


def native_expert(checkpoint: Checkpoint, layout: RecordLayout, layer: int, expert: int) -> QuantizedExpert:
    """The checkpoint's packed expert in the record's terms: its input order int32 (the identity
    for an expert without act order, where the format has input orders)."""
    packed = checkpoint.packed_expert(layer, expert)
    plain = dataclasses.replace(layout.format, input_perm=False)  # whether this expert has an order of its own aside
    if dataclasses.replace(packed.expert_format, input_perm=False) != plain:
        raise StoreError(
            f"layer {layer}, expert {expert}: expected the checkpoint's expert format {layout.format.name}, found "
            f"{packed.expert_format.name}"
        )
    perm = None
    if layout.format.input_perm:
        D = layout.w13_shape[1]
        perm = (torch.arange(D) if packed.input_perm is None else packed.input_perm).to(torch.int32)
    return QuantizedExpert(packed.w13, packed.w2, perm)
