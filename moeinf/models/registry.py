"""Which families moeinf runs, looked up by the `architectures` entry of config.json."""

from __future__ import annotations

from typing import Any

from moeinf.errors import ConfigError, UnsupportedArchitectureError
from moeinf.models.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from moeinf.models.family import Family
from moeinf.models.gpt_oss import GPT_OSS
from moeinf.models.mixtral import MIXTRAL
from moeinf.models.olmoe import OLMOE
from moeinf.models.phimoe import PHIMOE
from moeinf.models.qwen_moe import QWEN2_MOE, QWEN3_MOE
from moeinf.models.spec import ModelSpec

FAMILIES: tuple[Family, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, PHIMOE, DEEPSEEK_V2, DEEPSEEK_V3, GPT_OSS)
_BY_ARCHITECTURE = {arch: family for family in FAMILIES for arch in family.architectures}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_BY_ARCHITECTURE))


def family_for(config: dict[str, Any], source: str = "config.json") -> Family:
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object, found {type(config).__name__}")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ConfigError(
            f"{source}: expected 'architectures' to be a non-empty list such as "
            f"['MixtralForCausalLM'], found {architectures!r}"
        )
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    raise UnsupportedArchitectureError(
        f"{source}: architecture {', '.join(map(str, architectures))} is not supported; "
        f"supported architectures: {', '.join(supported_architectures())}"
    )


def spec_from_config(config: dict[str, Any], source: str = "config.json") -> tuple[Family, ModelSpec]:
    family = family_for(config, source)
    return family, family.parse_config(config, source)
