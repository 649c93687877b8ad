"""Reading the config.json fields that every decoder-only MoE family shares into a ModelSpec.

Families differ in a few key names and defaults (which key counts experts, which holds the
expert's intermediate size, whether top-k weights are renormalised); each passes those in, and
everything else is read and checked the same way.
"""

from __future__ import annotations

from typing import Any

from moeinf.errors import ConfigError
from moeinf.models.spec import ROPE_TYPES, ConfigReader, ModelSpec, read_rope

# integer-quantized checkpoints read as they are (loaders/quant_formats.py): the families whose routed
# experts are per-expert linear modules accept them
INT_QUANTIZATIONS = ("gptq", "compressed-tensors")


def first_key(read: ConfigReader, keys: tuple[str, ...]) -> str:
    """The first of `keys` present in the config (families renamed some keys across versions)."""
    for key in keys:
        if read.config.get(key) is not None:
            return key
    raise ConfigError(f"{read.source}: missing required key {keys[0]!r} (a positive integer)")


def sparse_layers(read: ConfigReader, num_layers: int) -> tuple[int, ...]:
    """Qwen's rule: a layer is MoE unless listed in mlp_only_layers, every decoder_sparse_step-th."""
    step = read.positive_int("decoder_sparse_step", 1)
    dense = read.config.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in dense):
        raise ConfigError(f"{read.source}: expected 'mlp_only_layers' to list layer indices, found {dense!r}")
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def fp8_block(quantization: dict[str, Any], source: str) -> tuple[int, int]:
    """The [rows, cols] block of a fine-grained FP8 quantization_config, checked."""
    block = quantization.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(
            f"{source}: expected quantization_config weight_block_size to be two positive integers such as "
            f"[128, 128], found {block!r} (per-tensor FP8 is not supported)"
        )
    fmt = quantization.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: expected quantization_config fmt 'e4m3', found {fmt!r}")
    return block[0], block[1]


def read_moe_spec(
    config: dict[str, Any],
    source: str,
    *,
    architecture: str,
    family: str,
    experts_keys: tuple[str, ...],
    expert_ffn_key: str,
    renormalize_key: str | None,
    renormalize_default: bool,
    default_theta: float,
    default_eps: float = 1e-6,
    default_max_position: int = 4096,
    # "all"; "sparse_step": Qwen's decoder_sparse_step / mlp_only_layers; "first_k_dense": every
    # layer from DeepSeek's first_k_dense_replace on
    moe_layers: str = "all",
    rope_types: tuple[str, ...] = ROPE_TYPES,  # the rope types this family computes like transformers
    head_dim: int | None = None,  # the family's own head size (MLA: q/k heads); None: config's head_dim
    rotary_dim: int | None = None,  # dims of a head that rotate, None: head_dim (times partial_rotary_factor)
    # quant_methods the family's checkpoints may use: fp8 / mxfp4 dequantized on load, INT_QUANTIZATIONS read
    # packed (loaders/quant_formats.py)
    quantizations: tuple[str, ...] = (),
    **features: Any,
) -> ModelSpec:
    """Defaults are transformers' config defaults for the family, used when a key is absent.
    features: ModelSpec fields a family sets itself (attention_bias, qk_norm, shared experts...)."""
    read = ConfigReader(config, source)
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
        method = method.lower() if isinstance(method, str) else method
        if method not in quantizations:
            readable = f"; this family reads {', '.join(quantizations)} checkpoints" if quantizations else ""
            raise ConfigError(
                f"{source}: quantization_config quant_method {method!r} is not supported{readable}; "
                "expected float32, float16 or bfloat16 weights (dequantize the checkpoint first)"
            )
        features["quantization"] = method
        if method == "fp8":
            features["quant_block"] = fp8_block(quantization, source)
    hidden = read.positive_int("hidden_size")
    heads = read.positive_int("num_attention_heads")
    kv_heads = read.positive_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = head_dim or read.optional_positive_int("head_dim") or hidden // heads
    experts_key = first_key(read, experts_keys)
    experts = read.positive_int(experts_key)
    top_k = read.positive_int("num_experts_per_tok")
    if top_k > experts:
        raise ConfigError(f"{source}: num_experts_per_tok ({top_k}) exceeds {experts_key} ({experts})")
    act = read.string("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: expected hidden_act 'silu' for SwiGLU experts, found {act!r}")
    num_layers = read.positive_int("num_hidden_layers")
    if moe_layers == "sparse_step":
        layers = sparse_layers(read, num_layers)
    elif moe_layers == "first_k_dense":
        layers = tuple(range(read.non_negative_int("first_k_dense_replace", 0), num_layers))
    else:
        layers = tuple(range(num_layers))
    if not layers:
        raise ConfigError(
            f"{source}: no layer has experts (first_k_dense_replace, decoder_sparse_step or mlp_only_layers leave none)"
        )
    renormalize = read.boolean(renormalize_key, renormalize_default) if renormalize_key else renormalize_default
    if "sliding_window" not in features:
        features["sliding_window"] = read.optional_positive_int("sliding_window")
    return ModelSpec(
        architecture=architecture,
        family=family,
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=read.positive_int("vocab_size"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_experts=experts,
        top_k=top_k,
        expert_ffn=read.positive_int(expert_ffn_key),
        norm_eps=read.positive_float("rms_norm_eps", default_eps),
        rope=read_rope(read, rotary_dim or head_dim, default_theta=default_theta, rope_types=rope_types),
        max_position=read.positive_int("max_position_embeddings", default_max_position),
        tie_word_embeddings=read.boolean("tie_word_embeddings", False),
        renormalize_topk=renormalize,
        torch_dtype=read.string("dtype", read.string("torch_dtype", "float32")),
        bos_token_id=(read.token_ids("bos_token_id") or (None,))[0],
        eos_token_ids=read.token_ids("eos_token_id"),
        moe_layers=layers,
        **features,
    )
