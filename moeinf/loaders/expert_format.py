"""ExpertFormat: how the routed experts' weights are held in a record (the store's, the host tier's,
a device slot's): in a float compute dtype, or quantized in one of kernels/quantize.py's layouts.

    kind   what a record holds (w13 [2F, D] gate then up rows, w2 [D, F])
    float  both matrices in `dtype` (float32, bfloat16, float16), biases after them (GPT-OSS)
    int8   without a scale_dtype: q int8 and a float32 scale per output channel, symmetric, for
           each matrix (RTN's int8, and GPTQ / compressed-tensors symmetric 8-bit per channel)
    int8   with a scale_dtype (float16 / bfloat16), "int8 grouped": q int8 (the unsigned code minus
           128), scales per group of `group_size` inputs (None: one group a row) in `scale_dtype`,
           and, unless `symmetric`, a uint8 zero per group (offset by 128 as q is): GPTQ 8-bit with
           groups or zero points, compressed-tensors W8A16 with groups, as they are
    int4   q uint8 (two inputs a byte), scales per group of `group_size` inputs (None: one group a
           row, GPTQ's group_size -1) in `scale_dtype`, and, unless `symmetric`, a uint8 zero per
           group
    either integer kind: `input_perm` adds the int32 [D] input order of an act-order checkpoint
           (GPTQ desc_act): w13 packs W13[:, perm], and is multiplied with x[perm]

A format's `name` names the store file (experts-<name>.moeinf), so the stores of two formats of
one checkpoint sit side by side: float32, int8, int4-g32, int4-channel-asym, int8-g128,
int8-g32-asym-bf16, int8-channel-asym, any of the quantized ones with -perm. `expert_dtype` (LLM, --expert-dtype) chooses one:
    "auto"                 the checkpoint's own quantized format when it has one, else the compute dtype
    "float32", "bfloat16", "float16"   float records in that dtype (must be the compute dtype)
    "int8"                 round to nearest per output channel (kernels/quantize.py's RTN)
    "int4", "int4-g64", "int4-g128"    round to nearest, symmetric, groups of 32 (default), 64 or 128
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moeinf.errors import ConfigError
from moeinf.kernels.quantize import GROUP_SIZES, SCALE_DTYPES

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("float", "int8", "int4")
DEFAULT_GROUP_SIZE = 32  # llama.cpp's Q4_0 block: the RTN default, and the one compared against it
DEFAULT_SCALE_DTYPE = torch.float16  # 11 significant bits against bfloat16's 8
EXPERT_DTYPE_CHOICES = ("auto", *FLOAT_DTYPES, "int8", "int4", "int4-g64", "int4-g128")
_INT4 = re.compile(r"int4(?:-g(\d+))?")


@dataclass(frozen=True)
class ExpertFormat:
    kind: str  # one of KINDS
    dtype: torch.dtype | None = None  # float: the dtype of the weights in the record
    group_size: int | None = None  # int4, grouped int8: inputs per scale; None: a whole row (per output channel)
    symmetric: bool = True  # int4: zero 8, grouped int8: zero 128 (no zero array)
    scale_dtype: torch.dtype | None = None  # int4, grouped int8: float16 or bfloat16; None: per-channel int8
    input_perm: bool = False  # int4 / int8: records carry an int32 [D] input order (act order)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"expert format: expected a kind among {', '.join(KINDS)}, found {self.kind!r}")
        if self.kind == "float" and self.dtype not in FLOAT_DTYPES.values():
            raise ConfigError(f"float expert format: expected a float dtype, found {self.dtype}")
        if self.kind == "int8" and self.scale_dtype is None and (self.group_size is not None or not self.symmetric):
            raise ConfigError(
                f"int8 expert format: expected either symmetric weights with one float32 scale per output channel "
                f"(no scale dtype, group size or zero) or grouped int8 with float16 / bfloat16 scales, found group "
                f"{self.group_size}, symmetric {self.symmetric} and no scale dtype"
            )
        if self.kind == "int8" and self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"grouped int8 expert format: expected float16 or bfloat16 scales, found {self.scale_dtype}"
            )
        if self.kind == "int4" and self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"int4 expert format: expected float16 or bfloat16 scales, found {self.scale_dtype}")

    def group_size_for(self, inputs: int) -> int:
        """int4, grouped int8: the group size of a matrix with `inputs` inputs (K itself for a
        per-channel format)."""
        return inputs if self.group_size is None else self.group_size

    @property
    def grouped(self) -> bool:
        """Whether the records hold 16-bit scales per group (int4, grouped int8), not float32 ones
        per output channel (int8)."""
        return self.kind == "int4" or (self.kind == "int8" and self.scale_dtype is not None)

    @classmethod
    def float(cls, dtype: torch.dtype) -> ExpertFormat:
        return cls("float", dtype)

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def name(self) -> str:
        """float32, int8, int4-g32, int4-channel, int4-g128-asym-bf16-perm, int8-g128,
        int8-channel-asym: the store file's name part."""
        if self.kind == "float":
            return str(self.dtype).removeprefix("torch.")
        parts = [self.kind]
        if self.grouped:
            parts.append("channel" if self.group_size is None else f"g{self.group_size}")
            if not self.symmetric:
                parts.append("asym")
            if self.scale_dtype == torch.bfloat16:
                parts.append("bf16")
        if self.input_perm:
            parts.append("perm")
        return "-".join(parts)

    def header(self) -> dict:
        """The store header's description of the format (JSON)."""
        return {
            "kind": self.kind,
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": None if self.scale_dtype is None else str(self.scale_dtype).removeprefix("torch."),
            "input_perm": self.input_perm,
        }


def rtn_format(kind: str, group_size: int | None = None) -> ExpertFormat:
    """The format round-to-nearest quantization writes: int8 per channel, or int4 symmetric in
    groups of group_size (DEFAULT_GROUP_SIZE) with float16 scales."""
    if kind == "int8":
        return ExpertFormat("int8")
    return ExpertFormat("int4", group_size=group_size or DEFAULT_GROUP_SIZE, scale_dtype=DEFAULT_SCALE_DTYPE)


def resolve_expert_format(
    expert_dtype: str, compute_dtype: torch.dtype, native: ExpertFormat | None = None
) -> ExpertFormat:
    """expert_dtype (see the module docstring) -> the records' format. native: the checkpoint's own
    quantized format, which "auto" keeps; a float checkpoint has none."""
    if not isinstance(expert_dtype, str) or expert_dtype not in EXPERT_DTYPE_CHOICES:
        raise ConfigError(f"expert_dtype: expected one of {', '.join(EXPERT_DTYPE_CHOICES)}, found {expert_dtype!r}")
    if expert_dtype == "auto":
        return native or ExpertFormat.float(compute_dtype)
    if expert_dtype in FLOAT_DTYPES:
        if FLOAT_DTYPES[expert_dtype] != compute_dtype:
            raise ConfigError(
                f"expert_dtype {expert_dtype!r}: float experts are computed in the compute dtype, expected "
                f"{str(compute_dtype).removeprefix('torch.')} (or set dtype={expert_dtype!r}), found {expert_dtype!r}"
            )
        return ExpertFormat.float(compute_dtype)
    if expert_dtype == "int8":
        return rtn_format("int8")
    group = _INT4.fullmatch(expert_dtype).group(1)
    group_size = int(group) if group else DEFAULT_GROUP_SIZE
    assert group_size in GROUP_SIZES  # EXPERT_DTYPE_CHOICES lists only these
    return rtn_format("int4", group_size)
