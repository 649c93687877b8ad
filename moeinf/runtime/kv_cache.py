"""Per-sequence KV cache, sized once for the sequence's whole life (prompt + max new tokens).

Under multi-head latent attention (DeepSeek) the cache holds what MLA caches: per token one normed
latent and the shared rotary key, concatenated as a single "key" head of kv_lora_rank + rope dims,
and no values (a zero-width v); the executor expands them into per-head keys and values."""

from __future__ import annotations

import numpy as np
import torch

from moeinf.errors import RequestError
from moeinf.kernels.bf16_bits import as_numpy
from moeinf.models.spec import ModelSpec


class SequenceKVCache:
    def __init__(self, spec: ModelSpec, capacity: int, device: torch.device, dtype: torch.dtype):
        if spec.mla is None:
            heads, k_dim, v_dim = spec.num_kv_heads, spec.head_dim, spec.head_dim
        else:
            heads, k_dim, v_dim = 1, spec.kv_a_dim, 0
        self.k = torch.empty((spec.num_layers, heads, capacity, k_dim), device=device, dtype=dtype)  # [L, Hkv, C, Dk]
        self.v = torch.empty((spec.num_layers, heads, capacity, v_dim), device=device, dtype=dtype)  # [L, Hkv, C, Dv]
        self.capacity = capacity
        self.length = 0  # tokens whose keys and values are written in every layer
        self._host_arrays: tuple[np.ndarray, np.ndarray] | None = None  # k and v as the host kernels take them

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new: [n, Hkv, Dk], v_new: [n, Hkv, Dv] for positions length .. length + n - 1 of `layer`.

        Returns this layer's keys and values for positions 0 .. length + n - 1, [Hkv, length + n, D].
        """
        end = self.length + k_new.shape[0]
        self.layer(layer, k_new.shape[0])
        self.k[layer, :, self.length : end] = k_new.transpose(0, 1)
        self.v[layer, :, self.length : end] = v_new.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def layer(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s whole keys and values [Hkv, C, D], for a caller that writes n new positions
        length .. length + n - 1 itself (the host attention kernel), after checking they fit."""
        self._check_fits(n)
        return self.k[layer], self.v[layer]

    def host_layer(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """layer(layer, n) as the host attention kernel's arrays (float32, or bfloat16 bits), sharing
        the cache's memory; the whole cache's arrays are made once, on first use."""
        k, v = self.host_arrays(n)
        return k[layer], v[layer]

    def host_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every layer's keys and values [L, Hkv, C, D] as host_layer's arrays, for a caller that
        writes n new positions into each layer, after checking they fit."""
        self._check_fits(n)
        if self._host_arrays is None:
            self._host_arrays = (as_numpy(self.k), as_numpy(self.v))
        return self._host_arrays

    def _check_fits(self, n: int) -> None:
        """Raises RequestError where n more positions do not fit."""
        if self.length + n > self.capacity:
            raise RequestError(f"KV cache holds {self.capacity} positions, a write needs {self.length + n}")

    def advance(self, n: int) -> None:
        """Called once every layer has written the n new positions."""
        self.length += n
