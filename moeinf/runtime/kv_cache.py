"""Per-sequence KV cache, sized once for the sequence's whole life (prompt + max new tokens)."""

from __future__ import annotations

import torch

from moeinf.errors import RequestError
from moeinf.models.spec import ModelSpec


class SequenceKVCache:
    def __init__(self, spec: ModelSpec, capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (spec.num_layers, spec.num_kv_heads, capacity, spec.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)  # [L, Hkv, capacity, Dh]
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0  # tokens whose keys and values are written in every layer

    def write(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new, v_new: [n, Hkv, Dh] for positions length .. length + n - 1 of `layer`.

        Returns this layer's keys and values for positions 0 .. length + n - 1, [Hkv, length + n, Dh].
        """
        end = self.length + k_new.shape[0]
        if end > self.capacity:
            raise RequestError(f"KV cache holds {self.capacity} positions, a write needs {end}")
        self.k[layer, :, self.length : end] = k_new.transpose(0, 1)
        self.v[layer, :, self.length : end] = v_new.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        """Called once every layer has written the n new positions."""
        self.length += n
