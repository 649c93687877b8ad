"""ModelSpec: the validated shape of a model, read from its config.json.

Everything downstream (tensor shape checks, the executor, budgets) reads the spec, never the raw
config dict, so a bad config fails here with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeinf.errors import ConfigError
from moeinf.kernels import mxfp4
from moeinf.kernels.expert_activation import SILU, ExpertActivation

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str  # one of ROPE_TYPES
    theta: float
    rotary_dim: int  # leading dims of each head that rotate (head_dim unless partial)
    factor: float = 1.0
    # llama3 and yarn knobs, as transformers names them; absent ones take transformers' defaults
    extra: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek's multi-head latent attention: queries through an optional low-rank bottleneck, keys
    and values from one shared latent per token (kv_lora_rank wide, what the KV cache holds) plus a
    single rotary key shared by all heads."""

    q_lora_rank: int | None  # None: q_proj straight from the hidden state
    kv_lora_rank: int
    qk_nope_head_dim: int  # the part of each q/k head without positions
    qk_rope_head_dim: int  # the rotary part; k's is shared by every head
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_ffn: int  # intermediate size of one expert
    norm_eps: float
    rope: RopeSpec
    max_position: int
    sliding_window: int | None
    tie_word_embeddings: bool
    renormalize_topk: bool
    torch_dtype: str  # dtype the checkpoint was saved in, e.g. "bfloat16"
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Decoder layers with routed experts, in order; the others run a dense SwiGLU MLP of dense_ffn.
    # Expert storage, offloading, policies and traces index MoE layers by position in this tuple.
    moe_layers: tuple[int, ...] = ()
    dense_ffn: int | None = None
    attention_bias: bool = False  # q, k and v projections carry biases (Qwen2-MoE, PhiMoE)
    attention_out_bias: bool = False  # o_proj carries a bias too (PhiMoE)
    lm_head_bias: bool = False  # the lm head adds a bias to the logits (PhiMoE)
    norm_type: str = "rms"  # "rms": RMSNorm (weight only); "layer": LayerNorm with weight and bias (PhiMoE)
    qk_norm: str | None = None  # "head": RMSNorm over each head (Qwen3-MoE); "full": over all q/k dims (OLMoE)
    clip_qkv: float | None = None  # q, k, v clamped to [-clip, clip] after projection (OLMoE)
    shared_expert_ffn: int | None = None  # an always-on expert beside the routed ones (Qwen2-MoE)
    shared_expert_gated: bool = False  # the shared expert's output is scaled by sigmoid(gate(x))
    # Mixtral multiplies expert outputs by float32 routing weights; Qwen and OLMoE cast them to the
    # hidden dtype first (the same in float32, not in bfloat16)
    router_weights_fp32: bool = True
    routing: str = "softmax_topk"  # the rule in models/routing.py that turns router logits into experts
    router_jitter_eps: float = 0.0  # sparsemixer's mask threshold is 2 * this (PhiMoE's router_jitter_noise)
    layer_windows: tuple[int | None, ...] = ()  # per-layer sliding window; () = sliding_window everywhere
    # DeepSeek: multi-head latent attention (head_dim is then the q/k head, qk_head_dim); None: GQA
    mla: MLASpec | None = None
    attention_scale: float | None = None  # softmax scale of q.k; None: head_dim ** -0.5
    rope_interleaved: bool = False  # rotary pairs are dims (2i, 2i+1) (DeepSeek), not (i, i + half)
    attention_sinks: bool = False  # a learnt per-head logit joins each softmax, then is dropped (GPT-OSS)
    # Routing knobs beyond top-k (see models/routing.py for the rules that read them)
    routed_scaling_factor: float = 1.0  # routed experts' weights times this (DeepSeek)
    n_group: int = 1  # experts fall into n_group groups, of which topk_group may be picked (DeepSeek)
    topk_group: int = 1
    router_bias: bool = False  # the router's linear layer has a bias (GPT-OSS)
    router_correction_bias: bool = False  # e_score_correction_bias steers choice, not weight (DeepSeek-V3)
    router_fp32: bool = False  # router weight kept and logits computed in float32 (DeepSeek)
    # the layer and final RMSNorms scale the float32 rows by their weight before rounding them to the
    # model dtype (GPT-OSS); the others round the rows first, then scale (Llama's order)
    norm_scale_fp32: bool = False
    # rotary embedding computed in float32 and rounded once (DeepSeek-V2's complex multiply);
    # otherwise in the model dtype with cos/sin rounded to it (transformers' rotate_half families)
    rope_fp32: bool = False
    expert_bias: bool = False  # routed experts' projections carry biases (GPT-OSS)
    expert_activation: ExpertActivation = SILU  # how an expert combines its gate and up projections
    # How the checkpoint is quantized (config.json's quant_method, lower case). "mxfp4": GPT-OSS's experts
    # packed (kernels/mxfp4.py); "fp8": linear weights float8 with a scale per quant_block of [rows, cols]
    # (kernels/fp8.py), both dequantized on load; "gptq", "compressed-tensors": integer weights packed
    # (loaders/quant_formats.py), dequantized or kept packed for the experts; None: plain float weights
    quantization: str | None = None
    quant_block: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gate_up_dim(self) -> int:
        """An expert's gate and up projections together: 2 * expert_ffn."""
        return 2 * self.expert_ffn

    @property
    def hidden_blocks(self) -> int:
        """MXFP4 scale blocks along hidden_size (mxfp4.BLOCK values each)."""
        return self.hidden_size // mxfp4.BLOCK

    @property
    def ffn_blocks(self) -> int:
        """MXFP4 scale blocks along expert_ffn."""
        return self.expert_ffn // mxfp4.BLOCK

    @property
    def attn_out_dim(self) -> int:
        """Width of the attention output that o_proj reads: heads * v_head_dim under MLA."""
        return self.num_heads * self.mla.v_head_dim if self.mla else self.q_dim

    @property
    def kv_a_dim(self) -> int:
        """MLA: kv_a_proj's output, the latent and the shared rotary key."""
        return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim

    @property
    def kv_b_dim(self) -> int:
        """MLA: kv_b_proj's output, each head's key (without positions) and value."""
        return self.num_heads * (self.mla.qk_nope_head_dim + self.mla.v_head_dim)

    @property
    def kv_lora_rank(self) -> int:
        return self.mla.kv_lora_rank

    @property
    def q_lora_rank(self) -> int:
        return self.mla.q_lora_rank

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: gate, up and down projections (and their biases)."""
        biases = 2 * self.expert_ffn + self.hidden_size if self.expert_bias else 0
        return 3 * self.hidden_size * self.expert_ffn + biases

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window


class ConfigReader:
    """Typed access to a config dict; every failure names the key, the expectation and the value."""

    def __init__(self, config: dict[str, Any], source: str = "config.json"):
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(config).__name__}")
        self.config = config
        self.source = source

    def _fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: expected {key!r} to be {expected}, found {value!r}")

    def positive_int(self, key: str, default: Any = ...) -> int:
        value = self.config.get(key, default)
        if value is ...:
            raise ConfigError(f"{self.source}: missing required key {key!r} (a positive integer)")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._fail(key, "a positive integer", value)
        return value

    def non_negative_int(self, key: str, default: Any = ...) -> int:
        value = self.config.get(key, default)
        if value is ...:
            raise ConfigError(f"{self.source}: missing required key {key!r} (an integer >= 0)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._fail(key, "an integer >= 0", value)
        return value

    def optional_positive_int(self, key: str) -> int | None:
        value = self.config.get(key)
        return None if value is None else self.positive_int(key)

    def positive_float(self, key: str, default: Any = ...) -> float:
        value = self.config.get(key, default)
        if value is ...:
            raise ConfigError(f"{self.source}: missing required key {key!r} (a positive number)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self._fail(key, "a positive number", value)
        return float(value)

    def non_negative_float(self, key: str, default: Any = ...) -> float:
        value = self.config.get(key, default)
        if value is ...:
            raise ConfigError(f"{self.source}: missing required key {key!r} (a number >= 0)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise self._fail(key, "a number >= 0", value)
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.config.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise self._fail(key, "a token id or a list of token ids", value)
        return tuple(values)

    def string(self, key: str, default: str) -> str:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value


def read_rope(
    reader: ConfigReader, head_dim: int, default_theta: float, rope_types: tuple[str, ...] = ROPE_TYPES
) -> RopeSpec:
    """RoPE settings from either layout transformers writes.

    transformers >= 5 writes `rope_parameters` {rope_type, rope_theta, factor, ...}; older files carry
    `rope_theta` at the top level and an optional `rope_scaling` {type | rope_type, factor, ...}.
    rope_types: the subset of ROPE_TYPES the family computes like transformers does.
    """
    config = reader.config
    key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    params = config.get(key) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{reader.source}: expected {key!r} to be an object, found {params!r}")
    params = dict(params)
    if key == "rope_scaling":
        params.setdefault("rope_theta", config.get("rope_theta", default_theta))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in rope_types:
        raise ConfigError(
            f"{reader.source}: rope type {rope_type!r} is not supported; supported: {', '.join(rope_types)}"
        )
    sub = ConfigReader(params, f"{reader.source} rope parameters")
    theta = sub.positive_float("rope_theta", default_theta)
    partial = sub.positive_float("partial_rotary_factor", 1.0)
    if partial > 1:
        raise ConfigError(f"{sub.source}: expected partial_rotary_factor <= 1, found {partial}")
    if rope_type == "yarn":
        # yarn may leave `factor` out: transformers then uses max_position / original_max_position
        original = params.get("original_max_position_embeddings")
        if original is None:
            original = params["original_max_position_embeddings"] = config.get("max_position_embeddings")
        sub.positive_float("original_max_position_embeddings")
        if params.get("factor") is None:
            params["factor"] = reader.positive_float("max_position_embeddings") / float(original)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            sub.positive_float(key)
    factor = 1.0 if rope_type == "default" else sub.positive_float("factor")
    for key in ("rope_theta", "partial_rotary_factor", "factor"):
        params.pop(key, None)
    return RopeSpec(
        rope_type=rope_type,
        theta=theta,
        rotary_dim=int(head_dim * partial),
        factor=factor,
        extra=tuple(sorted(params.items())),
    )
