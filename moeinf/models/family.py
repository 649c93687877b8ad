"""Family: what one model architecture is, as data — its tensor names, their shapes, its config.

A tensor name pattern may hold `{layer}` and `{expert}`; a shape is a tuple of ModelSpec attribute
names (or literal ints), so the loader can check every tensor on disk against the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from moeinf.models.spec import ModelSpec

Shape = tuple[str | int, ...]

# The shape of every role, in ModelSpec attribute names; families whose tensors differ override
# entries (OLMoE's full-width q/k norms).
ROLE_SHAPES: dict[str, Shape] = {
    "embed": ("vocab_size", "hidden_size"),
    "final_norm": ("hidden_size",),
    "lm_head": ("vocab_size", "hidden_size"),
    "attn_norm": ("hidden_size",),
    "q_proj": ("q_dim", "hidden_size"),
    "k_proj": ("kv_dim", "hidden_size"),
    "v_proj": ("kv_dim", "hidden_size"),
    "o_proj": ("hidden_size", "q_dim"),
    "q_bias": ("q_dim",),
    "k_bias": ("kv_dim",),
    "v_bias": ("kv_dim",),
    "q_norm": ("head_dim",),  # per-head norms (Qwen3)
    "k_norm": ("head_dim",),
    "ffn_norm": ("hidden_size",),
    "router": ("num_experts", "hidden_size"),
    "expert_gate": ("expert_ffn", "hidden_size"),
    "expert_up": ("expert_ffn", "hidden_size"),
    "expert_down": ("hidden_size", "expert_ffn"),
    "shared_gate": ("shared_expert_ffn", "hidden_size"),
    "shared_up": ("shared_expert_ffn", "hidden_size"),
    "shared_down": ("hidden_size", "shared_expert_ffn"),
    "shared_expert_gate": (1, "hidden_size"),
    "mlp_gate": ("dense_ffn", "hidden_size"),
    "mlp_up": ("dense_ffn", "hidden_size"),
    "mlp_down": ("hidden_size", "dense_ffn"),
    "final_norm_bias": ("hidden_size",),
    "lm_head_bias": ("vocab_size",),
    "attn_norm_bias": ("hidden_size",),
    "ffn_norm_bias": ("hidden_size",),
    "o_bias": ("hidden_size",),
}

# Roles the executor asks for; a family maps the ones it has to names on disk.
GLOBAL_ROLES = ("embed", "final_norm", "lm_head")
FINAL_NORM_BIAS_ROLES = ("final_norm_bias",)
LM_HEAD_BIAS_ROLES = ("lm_head_bias",)
ATTENTION_ROLES = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "ffn_norm")
NORM_BIAS_ROLES = ("attn_norm_bias", "ffn_norm_bias")
ATTENTION_BIAS_ROLES = ("q_bias", "k_bias", "v_bias")
ATTENTION_OUT_BIAS_ROLES = ("o_bias",)
QK_NORM_ROLES = ("q_norm", "k_norm")
ROUTER_ROLES = ("router",)
EXPERT_ROLES = ("expert_gate", "expert_up", "expert_down")
SHARED_EXPERT_ROLES = ("shared_gate", "shared_up", "shared_down")
SHARED_EXPERT_GATE_ROLES = ("shared_expert_gate",)
DENSE_MLP_ROLES = ("mlp_gate", "mlp_up", "mlp_down")


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    tensor_names: dict[str, str]  # role -> name pattern
    tensor_shapes: dict[str, Shape]  # role -> shape in spec attribute names
    parse_config: Callable[[dict[str, Any], str], ModelSpec]

    def tensor_name(self, role: str, layer: int | None = None, expert: int | None = None) -> str:
        return self.tensor_names[role].format(layer=layer, expert=expert)

    def tensor_shape(self, spec: ModelSpec, role: str) -> tuple[int, ...]:
        return tuple(dim if isinstance(dim, int) else getattr(spec, dim) for dim in self.tensor_shapes[role])

    def global_roles(self, spec: ModelSpec) -> tuple[str, ...]:
        roles = tuple(r for r in GLOBAL_ROLES if not (r == "lm_head" and spec.tie_word_embeddings))
        roles += FINAL_NORM_BIAS_ROLES if spec.norm_type == "layer" else ()
        # a tied head shares the embedding's weight, never a bias: the bias is its own tensor
        roles += LM_HEAD_BIAS_ROLES if spec.lm_head_bias else ()
        return roles

    def layer_roles(self, spec: ModelSpec, layer: int) -> tuple[str, ...]:
        """The per-layer (not per-expert) roles of decoder layer `layer` under this spec."""
        roles = ATTENTION_ROLES
        roles += NORM_BIAS_ROLES if spec.norm_type == "layer" else ()
        roles += ATTENTION_BIAS_ROLES if spec.attention_bias else ()
        roles += ATTENTION_OUT_BIAS_ROLES if spec.attention_out_bias else ()
        roles += QK_NORM_ROLES if spec.qk_norm else ()
        if layer in spec.moe_layers:
            roles += ROUTER_ROLES
            roles += SHARED_EXPERT_ROLES if spec.shared_expert_ffn else ()
            roles += SHARED_EXPERT_GATE_ROLES if spec.shared_expert_gated else ()
        else:
            roles += DENSE_MLP_ROLES
        return roles

    def expected_tensors(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Every tensor name the model reads -> the shape it must have on disk."""
        expected = {self.tensor_name(r): self.tensor_shape(spec, r) for r in self.global_roles(spec)}
        for layer in range(spec.num_layers):
            for role in self.layer_roles(spec, layer):
                expected[self.tensor_name(role, layer)] = self.tensor_shape(spec, role)
        for layer in spec.moe_layers:
            for expert in range(spec.num_experts):
                for role in EXPERT_ROLES:
                    expected[self.tensor_name(role, layer, expert)] = self.tensor_shape(spec, role)
        return expected
