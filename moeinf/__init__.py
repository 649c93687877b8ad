"""moeinf: serve Mixture-of-Experts language models layer by layer, experts streamed by activation."""

from moeinf.errors import MoeinfError
from moeinf.loaders.default_model import ensure_default_model
from moeinf.runtime.engine import LLM, RequestOutput
from moeinf.runtime.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "MoeinfError", "ensure_default_model"]
