"""moeinf: serve Mixture-of-Experts language models layer by layer, experts streamed by activation.

The public names are imported when first used, not with the package: importing a torch-free part
(moeinf.runtime.cache, moeinf.runtime.replay) then imports no torch, so trace replay runs on any
machine with numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeinf.errors import MoeinfError
    from moeinf.loaders.default_model import ensure_default_model
    from moeinf.runtime.engine import LLM, RequestOutput
    from moeinf.runtime.sampling import SamplingParams
    from moeinf.runtime.setup import OffloadConfig

_HOMES = {
    "LLM": "moeinf.runtime.engine",
    "RequestOutput": "moeinf.runtime.engine",
    "SamplingParams": "moeinf.runtime.sampling",
    "OffloadConfig": "moeinf.runtime.setup",
    "MoeinfError": "moeinf.errors",
    "ensure_default_model": "moeinf.loaders.default_model",
}
__all__ = ["LLM", "SamplingParams", "OffloadConfig", "RequestOutput", "MoeinfError", "ensure_default_model"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'moeinf' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
