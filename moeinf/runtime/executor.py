"""Layer-by-layer execution of a batch of sequences, flattened to one token axis.

Every token of every sequence in the step sits on one axis [T]; norms, projections, the router and
the experts run over all of them at once (so a layer's experts serve the whole batch), and only
attention splits the axis back into sequences, each against its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeinf.kernels import ops
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.models.attention import attend
from moeinf.models.rope import RotaryTable, apply_rope
from moeinf.models.routing import softmax_topk
from moeinf.runtime.dense_weights import DenseWeights
from moeinf.runtime.eam import PREFILL, SequenceEAM
from moeinf.runtime.kv_cache import SequenceKVCache
from moeinf.runtime.policies import CachePolicy
from moeinf.runtime.expert_pool import ExpertPool
from moeinf.runtime.resident_experts import ResidentExperts

# Where the executor finds experts: all resident, or a pool of fewer slots fed from host and disk.
# Both expose w13 [S, 2F, D], w2 [S, D, F] and acquire(layer, topk_ids) -> [E] slots / release(layer).
ExpertSource = ResidentExperts | ExpertPool


@dataclass
class Span:
    """One sequence's new tokens in a step: `count` rows of the flat token axis."""

    cache: SequenceKVCache
    count: int
    eam: SequenceEAM | None = None  # where the routing of these tokens is counted, if anywhere
    phase: int = PREFILL


class Executor:
    def __init__(
        self,
        checkpoint: Checkpoint,
        experts: ExpertSource,
        policy: CachePolicy | None,
        device: torch.device,
        dtype: torch.dtype,
        progress: bool = True,
    ):
        self.spec = checkpoint.spec
        self.device, self.dtype = device, dtype
        self.dense = DenseWeights.load(checkpoint, device, dtype, progress)
        self.experts = experts
        self.policy = policy  # the offloading policy, told the next layer's routing if it asks
        self.rotary = RotaryTable(self.spec.rope, device)

    def new_cache(self, capacity: int) -> SequenceKVCache:
        return SequenceKVCache(self.spec, capacity, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, spans: list[Span], rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [T] int64, the spans' new tokens back to back; rows: [R] which of the T rows
        need logits (None = all). Returns logits [R, V] float32. Advances every span's cache."""
        spec = self.spec
        positions = torch.cat(
            [torch.arange(s.cache.length, s.cache.length + s.count, device=self.device) for s in spans]
        )  # [T]
        cos, sin = self.rotary.cos_sin(positions, self.dtype)  # [T, rotary_dim]
        h = self.dense.embed[tokens]  # [T, D]
        T = h.shape[0]
        for layer, lw in enumerate(self.dense.layers):
            x = ops.rms_norm(h, lw.attn_norm, spec.norm_eps)
            q, k, v = F.linear(x, lw.qkv).split([spec.q_dim, spec.kv_dim, spec.kv_dim], dim=-1)
            q = apply_rope(q.view(T, spec.num_heads, spec.head_dim), cos, sin)  # [T, H, Dh]
            k = apply_rope(k.view(T, spec.num_kv_heads, spec.head_dim), cos, sin)  # [T, Hkv, Dh]
            v = v.view(T, spec.num_kv_heads, spec.head_dim)
            attn = torch.empty((T, spec.q_dim), device=self.device, dtype=self.dtype)
            offset = 0
            for span in spans:
                r = slice(offset, offset + span.count)
                k_all, v_all = span.cache.write(layer, k[r], v[r])
                attn[r] = attend(q[r], k_all, v_all, span.cache.length, spec.sliding_window)
                offset += span.count
            h = h + F.linear(attn, lw.o_proj)

            if self.policy is not None and self.policy.wants_lookahead and layer + 1 < spec.num_layers:
                self.policy.lookahead(layer, self._route_counts(h, layer + 1))
            x = ops.rms_norm(h, lw.moe_norm, spec.norm_eps)
            ids, weights = softmax_topk(F.linear(x, lw.router), spec.top_k, spec.renormalize_topk)
            self._trace(layer, ids, spans)
            slots = self.experts.acquire(layer, ids)
            h = h + ops.moe_experts(x, ids, weights, self.experts.w13, self.experts.w2, slots)
            self.experts.release(layer)
        for span in spans:
            span.cache.advance(span.count)
        if rows is not None:
            h = h[rows]
        h = ops.rms_norm(h, self.dense.final_norm, spec.norm_eps)
        return F.linear(h, self.dense.lm_head).to(torch.float32)

    def _route_counts(self, h: torch.Tensor, layer: int) -> list[int]:
        """[E] tokens that `layer`'s router would send to each expert, given hidden states h [T, D]."""
        lw = self.dense.layers[layer]
        x = ops.rms_norm(h, lw.moe_norm, self.spec.norm_eps)
        ids, _ = softmax_topk(F.linear(x, lw.router), self.spec.top_k, self.spec.renormalize_topk)
        return torch.bincount(ids.reshape(-1), minlength=self.spec.num_experts).tolist()

    @staticmethod
    def _trace(layer: int, ids: torch.Tensor, spans: list[Span]) -> None:
        """Counts each span's routing at `layer` into its EAM. ids: [T, K]."""
        if all(span.eam is None for span in spans):
            return
        ids_np = ids.cpu().numpy()
        offset = 0
        for span in spans:
            if span.eam is not None:
                span.eam.add(span.phase, layer, ids_np[offset : offset + span.count])
            offset += span.count
