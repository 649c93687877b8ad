"""The dense (non-expert) weights, resident on the compute device for the whole run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from moeinf.loaders.checkpoint import Checkpoint


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    qkv: torch.Tensor  # [q_dim + 2 kv_dim, D]: q, k, v projections in one GEMM
    o_proj: torch.Tensor  # [D, q_dim]
    moe_norm: torch.Tensor  # [D]
    router: torch.Tensor  # [E, D]


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, D]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]; the embedding itself when tied
    layers: list[LayerWeights]

    @classmethod
    def load(
        cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, progress: bool = True
    ) -> DenseWeights:
        def read(role: str, layer: int | None = None) -> torch.Tensor:
            return checkpoint.read(role, layer).to(device=device, dtype=dtype)

        layers = []
        for layer in tqdm(range(checkpoint.spec.num_layers), desc="dense weights", unit="layer", disable=not progress):
            layers.append(
                LayerWeights(
                    attn_norm=read("attn_norm", layer),
                    qkv=torch.cat([read(r, layer) for r in ("q_proj", "k_proj", "v_proj")]),
                    o_proj=read("o_proj", layer),
                    moe_norm=read("moe_norm", layer),
                    router=read("router", layer),
                )
            )
        embed = read("embed")
        lm_head = embed if checkpoint.spec.tie_word_embeddings else read("lm_head")
        return cls(embed=embed, final_norm=read("final_norm"), lm_head=lm_head, layers=layers)

    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm] + [t for lw in self.layers for t in vars(lw).values()]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in tensors)
