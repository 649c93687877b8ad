"""A Hugging Face checkpoint folder, opened and checked: config -> spec, tensors -> index.

Opening checks every tensor the model reads against the shape the spec expects, so a bad
checkpoint fails before any weight is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from moeinf.errors import ConfigError, TensorDtypeError, TensorShapeError
from moeinf.kernels.fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_fp8, scale_shape
from moeinf.kernels.mxfp4 import dequantize_mxfp4
from moeinf.loaders.safetensors_index import TensorIndex
from moeinf.models.family import EXPERT_ROLES, Family
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
    """One routed expert in the slot layout, in the checkpoint's dtype, on the CPU."""

    w13: torch.Tensor  # [2F, D]: gate rows, then up rows
    w2: torch.Tensor  # [D, F]: down
    b13: torch.Tensor | None  # [2F]: gate then up biases (GPT-OSS); None without biases
    b2: torch.Tensor | None  # [D]


@dataclass
class Checkpoint:
    path: Path
    family: Family
    spec: ModelSpec
    index: TensorIndex

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
        family, spec = spec_from_config(config, str(path / "config.json"))
        index = TensorIndex.open(path)
        check_tensors(family, spec, index)
        return cls(path, family, spec, index)

    def read(self, role: str, layer: int | None = None, expert: int | None = None) -> torch.Tensor:
        """A tensor by role; `layer` is the decoder layer. FP8 weights come back dequantized (float32)."""
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

    @property
    def tokenizer_file(self) -> Path | None:
        candidate = self.path / "tokenizer.json"
        return candidate if candidate.exists() else None


def check_tensors(family: Family, spec: ModelSpec, index: TensorIndex) -> None:
    for name, (shape, dtypes) in family.expected_tensors(spec).items():
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
