"""Layer-by-layer execution of a batch of sequences, flattened to one token axis.

Every token of every sequence in the step sits on one axis [T]; norms, projections, the router and
the experts run over all of them at once (so a layer's experts serve the whole batch), and only
attention splits the axis back into sequences, each against its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moeinf.kernels import host_attention, host_decode_block, host_norm
from moeinf.kernels.bf16_bits import as_numpy, as_tensor, empty_like_elements
from moeinf.kernels.ops import Kernels
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.models import mla
from moeinf.models.attention import attend
from moeinf.models.mlp import swiglu
from moeinf.models.rope import RotaryTable, apply_rope
from moeinf.models.routing import route
from moeinf.runtime.cache.eam import PREFILL, SequenceEAM
from moeinf.runtime.dense_weights import DenseWeights, LayerWeights
from moeinf.runtime.experts.source import ExpertSource, LayerRouting
from moeinf.runtime.host_decode import HostDecodeWeights, ResidentBlockExperts
from moeinf.runtime.kv_cache import SequenceKVCache
from moeinf.runtime.routing_record import RoutingRecord


@dataclass
class Span:
    """One sequence's new tokens in a step: `count` rows of the flat token axis."""

    cache: SequenceKVCache
    count: int
    eam: SequenceEAM | None = None  # where the routing of these tokens is counted, if anywhere
    phase: int = PREFILL
    record: RoutingRecord | None = None  # per-token routing of this step, when traces are recorded


class Executor:
    def __init__(
        self,
        checkpoint: Checkpoint,
        experts: ExpertSource,
        device: torch.device,
        dtype: torch.dtype,
        kernels: Kernels,
        progress: bool = True,
    ):
        self.spec = checkpoint.spec
        self.device, self.dtype = device, dtype
        self.dense = DenseWeights.load(checkpoint, device, dtype, progress)
        self.experts = experts  # where each MoE layer's experts are found, told what each step routes
        self.rotary = RotaryTable(self.spec.rope, device)
        self.kernels = kernels  # norms, routing and experts: Triton kernels or their torch references
        # attention the host kernel can run (decode steps in float32 or bfloat16 on the CPU): rope on q
        # and k as Hugging Face lays it out, in the model dtype, nothing between the projection and the softmax
        self.plain_attention = (
            self.spec.mla is None
            and self.spec.qk_norm is None
            and self.spec.clip_qkv is None
            and not self.spec.rope_interleaved
            and not self.spec.attention_sinks
            and not self.spec.rope_fp32
        )
        # what the host decode block reads, where it can run this model's decode steps (CPU; see
        # _decode_block_layers), and the resident experts where it computes them itself; None where not
        self.host_decode = HostDecodeWeights.build(self.spec, self.dense, device, dtype, kernels, self.plain_attention)
        self.resident_experts = (
            None if self.host_decode is None else ResidentBlockExperts.build(self.spec, experts, dtype)
        )

    def new_cache(self, capacity: int) -> SequenceKVCache:
        return SequenceKVCache(self.spec, capacity, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, spans: list[Span], rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [T] int64, the spans' new tokens back to back; rows: [R] which of the T rows
        need logits (None = all). Returns logits [R, V] float32. Advances every span's cache."""
        positions = torch.cat(
            [torch.arange(s.cache.length, s.cache.length + s.count, device=self.device) for s in spans]
        )  # [T]
        cos, sin = self.rotary.cos_sin(positions, torch.float32 if self.spec.rope_fp32 else self.dtype)  # [T, rot]
        h = self.dense.embed[tokens]  # [T, D] the residual stream (a gathered copy: added to in place)
        most_new = max(span.count for span in spans)  # 1: a decode step proper
        host_trig = None  # the rotary table as the host attention kernel's float32 arrays (CPU only)
        if self.plain_attention and self.device.type == "cpu":
            host_trig = (cos.float().contiguous().numpy(), sin.float().contiguous().numpy())
        if self.host_decode is not None and most_new == 1 and tokens.shape[0] <= host_decode_block.MAX_TOKENS:
            normed = self._decode_block_layers(h, host_trig, spans)  # [T, D] through the final norm
            if rows is not None:
                normed = normed[rows]
        else:
            self._layers(h, cos, sin, host_trig, spans, most_new)
            normed = self._norm(h if rows is None else h[rows], self.dense.final_norm, self.dense.final_norm_bias)
        for span in spans:
            span.cache.advance(span.count)
        return F.linear(normed, self.dense.lm_head, self.dense.lm_head_bias).to(torch.float32)

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        host_trig: tuple[np.ndarray, np.ndarray] | None,
        spans: list[Span],
        most_new: int,
    ) -> None:
        """Every layer, op by op: h [T, D] the residual stream, advanced in place; cos, sin [T, rot]
        the step's rotary table (host_trig: as float32 arrays, None off the CPU); most_new: the most
        new tokens a sequence of the step has."""
        layers = self.dense.layers
        x = self._norm(h, layers[0].attn_norm, layers[0].attn_norm_bias)  # [T, D] the next block's input
        for layer, lw in enumerate(layers):
            attended = self._attention(layer, lw, x, cos, sin, host_trig, spans, most_new)
            x = self._add_norm(h, attended, lw.ffn_norm, lw.ffn_norm_bias, most_new)
            y = swiglu(x, lw.mlp_w13, lw.mlp_w2) if lw.moe_index is None else self._moe(lw, h, x, spans)
            if layer + 1 < len(layers):
                x = self._add_norm(h, y, layers[layer + 1].attn_norm, layers[layer + 1].attn_norm_bias, most_new)
            else:
                h.add_(y)

    def _decode_block_layers(
        self, h: torch.Tensor, host_trig: tuple[np.ndarray, np.ndarray], spans: list[Span]
    ) -> torch.Tensor:
        """Every layer of a decode step proper (one new token per sequence) on the host: per layer
        each sequence's host attention, then host_decode_block from its output to the next layer's
        qkv projection, in one call with resident experts (nothing to acquire, nothing counted per
        sequence), else around the expert source's acquire and the routed experts' kernel; a lone
        sequence with resident experts runs the whole step in one call (decode_layers).
        h: [T, D] the residual stream, advanced in place through every layer; host_trig: the step's
        cos, sin [T, rot] float32. Returns h through the model's final norm, [T, D]."""
        spec, T, D, host = self.spec, h.shape[0], h.shape[1], self.host_decode
        blocks = host.layers
        bf16, eps, scale_fp32 = self.dtype == torch.bfloat16, np.float32(spec.norm_eps), spec.norm_scale_fp32
        weigh_dtype = torch.float32 if spec.router_weights_fp32 else self.dtype  # experts' outputs weighed in
        route = (spec.renormalize_topk, spec.routed_scaling_factor)
        resident = self.resident_experts if all(s.eam is None and s.record is None for s in spans) else None
        residual, hits = as_numpy(h), 0  # [T, D]; distinct experts the resident layers used
        if resident is not None and len(spans) == 1:  # one sequence: the whole step in one call
            out = empty_like_elements((T, D), self.dtype)  # [T, D] h through the final norm
            cache = spans[0].cache
            hits = host_decode_block.decode_layers(
                residual, *host_trig, *cache.host_arrays(T), cache.length, host.windows, *host.attention,
                *host.by_kind, host.final_norm, eps, bf16, scale_fp32,
                *route, empty_like_elements((len(blocks), T, spec.top_k), weigh_dtype), weigh_dtype == torch.bfloat16,
                resident.slots, *resident.buffers, *resident.activation, out,
            )  # fmt: skip
            self.experts.count_hits(hits)
            return as_tensor(out)
        normed = empty_like_elements((T, D), self.dtype)  # [T, D] the first layer's input
        host_norm.rms_norm_rows(residual, blocks[0][0], eps, bf16, scale_fp32, normed)
        qkv = empty_like_elements((T, blocks[0][1].shape[0]), self.dtype)  # [T, q_dim + 2 kv_dim]
        host_decode_block.project_rounded(normed, blocks[0][1], qkv)
        for layer, (lw, (_, _, w_o, ffn_norm, w_router)) in enumerate(zip(self.dense.layers, blocks)):
            has_next = layer + 1 < len(blocks)
            # the next layer's norm and qkv projection, or the final norm (and no projection)
            next_norm, w_qkv = blocks[layer + 1][:2] if has_next else (host.final_norm, blocks[0][1][:0])
            next_qkv = empty_like_elements((T, w_qkv.shape[0] if has_next else D), self.dtype)  # or the final rows
            weights = empty_like_elements((T, spec.top_k), weigh_dtype)  # [T, K]
            attn = self._attend_on_host(layer, qkv, host_trig, spans)  # [T, q_dim]
            qkv = next_qkv
            if resident is not None:
                hits += host_decode_block.route_experts_project(
                    attn, w_o, residual, ffn_norm, eps, bf16, scale_fp32, w_router, *route, weights,
                    weigh_dtype == torch.bfloat16, resident.slots[lw.moe_index], *resident.buffers, *resident.activation,
                    has_next, next_norm, w_qkv, qkv,
                )  # fmt: skip
                continue
            o, normed = (empty_like_elements((T, D), self.dtype) for _ in range(2))
            ids = np.empty((T, spec.top_k), np.int64)
            host_decode_block.project_norm_route(
                attn, w_o, residual, ffn_norm, eps, bf16, scale_fp32, w_router, *route, o, normed, ids, weights
            )
            routed = self._routed_experts(lw, h, as_tensor(normed), torch.from_numpy(ids), as_tensor(weights), spans)
            if has_next:
                normed = empty_like_elements((T, D), self.dtype)
                host_decode_block.norm_and_project(
                    residual, as_numpy(routed), next_norm, eps, bf16, scale_fp32, w_qkv, normed, qkv
                )
            else:
                host_norm.add_rms_norm_rows(residual, as_numpy(routed), next_norm, eps, bf16, scale_fp32, qkv)
        if hits:
            self.experts.count_hits(hits)
        return as_tensor(qkv)

    def _norm(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """h: [T, D] -> [T, D] through the family's norm: RMSNorm, or LayerNorm with a bias (PhiMoE),
        which runs in the model dtype as torch's nn.LayerNorm does."""
        if self.spec.norm_type == "layer":
            return F.layer_norm(h, (h.shape[-1],), weight, bias, self.spec.norm_eps)
        return self.kernels.rms_norm(h, weight, self.spec.norm_eps, self.spec.norm_scale_fp32)

    def _add_norm(
        self, h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, most_new: int
    ) -> torch.Tensor:
        """h: [T, D] residual stream += y [T, D], in place; returns the new h through the next norm.
        most_new: the most new tokens a sequence of the step has."""
        if self.spec.norm_type == "layer":
            h.add_(y)
            return self._norm(h, weight, bias)
        return self.kernels.add_rms_norm(
            h, y, weight, self.spec.norm_eps, self.spec.norm_scale_fp32, most_new_tokens=most_new
        )

    def _attention(
        self,
        layer: int,
        lw: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        host_trig: tuple[np.ndarray, np.ndarray] | None,
        spans: list[Span],
        most_new: int,
    ) -> torch.Tensor:
        """x: [T, D] normed hidden states -> attention output projected back to [T, D]. cos, sin: [T,
        rot] in the rope dtype; host_trig: them as float32 arrays for the host kernel (None where it
        cannot run: off the CPU, or attention it does not do); most_new: the most new tokens a
        sequence of the step has."""
        if lw.mla is not None:
            return self._latent_attention(layer, lw, x, cos, sin, spans)
        spec, T = self.spec, x.shape[0]
        qkv = F.linear(x, lw.qkv, lw.qkv_bias)  # [T, q_dim + 2 kv_dim]
        host = host_trig is not None and lw.sinks is None
        if host and self.kernels.attends_on_host(qkv, spans[0].cache.k, most_new):
            return F.linear(
                as_tensor(self._attend_on_host(layer, as_numpy(qkv), host_trig, spans)), lw.o_proj, lw.o_bias
            )
        q, k, v = qkv.split([spec.q_dim, spec.kv_dim, spec.kv_dim], dim=-1)
        if spec.qk_norm == "full":
            q, k = (self.kernels.rms_norm(t, w, spec.norm_eps) for t, w in ((q, lw.q_norm), (k, lw.k_norm)))
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        q = q.view(T, spec.num_heads, spec.head_dim)  # [T, H, Dh]
        k = k.view(T, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, Dh]
        v = v.view(T, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm == "head":
            q, k = (self.kernels.rms_norm(t, w, spec.norm_eps) for t, w in ((q, lw.q_norm), (k, lw.k_norm)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = torch.empty((T, spec.q_dim), device=self.device, dtype=self.dtype)
        offset = 0
        for span in spans:
            r = slice(offset, offset + span.count)
            k_all, v_all = span.cache.write(layer, k[r], v[r])
            attn[r] = attend(q[r], k_all, v_all, span.cache.length, spec.window(layer), spec.attention_scale, lw.sinks)
            offset += span.count
        return F.linear(attn, lw.o_proj, lw.o_bias)

    def _attend_on_host(
        self, layer: int, rows: np.ndarray, host_trig: tuple[np.ndarray, np.ndarray], spans: list[Span]
    ) -> np.ndarray:
        """rows: [T, q_dim + 2 kv_dim] the qkv projection's elements -> the attention output's [T,
        q_dim]: each span's rope, cache write and attention in one host call (kernels/host_attention.py).
        host_trig: the step's cos, sin [T, rot] float32."""
        spec, outputs, offset = self.spec, [], 0
        for span in spans:
            r = slice(offset, offset + span.count)
            k_cache, v_cache = span.cache.host_layer(layer, span.count)
            outputs.append(
                host_attention.attend_decode_elements(
                    rows[r],
                    host_trig[0][r],
                    host_trig[1][r],
                    k_cache,
                    v_cache,
                    span.cache.length,
                    spec.window(layer),
                    spec.attention_scale,
                    spec.num_heads,
                    spec.num_kv_heads,
                )
            )
            offset += span.count
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _latent_attention(
        self, layer: int, lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: list[Span]
    ) -> torch.Tensor:
        """Multi-head latent attention (see models/mla.py): x [T, D] normed -> [T, D]. Each span
        caches its tokens' latents, then attends over its whole latent cache."""
        spec, T = self.spec, x.shape[0]
        q = mla.queries(x, lw.mla, spec, cos, sin, self.kernels)  # [T, H, nope + rope]
        cached = mla.latents(x, lw.mla, spec, cos, sin, self.kernels)  # [T, 1, kv_lora + rope]
        attn = torch.empty((T, spec.attn_out_dim), device=self.device, dtype=self.dtype)
        offset = 0
        for span in spans:
            r = slice(offset, offset + span.count)
            latents, _ = span.cache.write(layer, cached[r], cached[r, :, :0])  # [1, S, kv_lora + rope]
            attn[r] = mla.attend_cached(q[r], latents, lw.mla, spec, span.cache.length, spec.window(layer))
            offset += span.count
        return F.linear(attn, lw.o_proj, lw.o_bias)

    def _moe(self, lw: LayerWeights, h: torch.Tensor, x: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        """Routed experts (+ the shared expert) of one MoE layer. h: [T, D] residual stream after
        attention (what the next MoE layer's router is applied to for lookahead); x: [T, D] normed."""
        ids, weights = self._route(lw, x)
        if not self.spec.router_weights_fp32:
            weights = weights.to(self.dtype)  # the family weighs expert outputs in the model dtype
        y = self._routed_experts(lw, h, x, ids, weights, spans)
        if lw.shared_w13 is not None:
            shared = swiglu(x, lw.shared_w13, lw.shared_w2)
            if lw.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x, lw.shared_gate)) * shared
            y = y + shared
        return y

    def _routed_experts(
        self,
        lw: LayerWeights,
        h: torch.Tensor,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        spans: list[Span],
    ) -> torch.Tensor:
        """The routed experts of one MoE layer for its routing ids, weights [T, K] (weights in the dtype
        expert outputs are weighed in): counted, acquired from the expert source, computed, released.
        h: [T, D] the residual stream after attention (the next MoE layer's lookahead routes it);
        x: [T, D] normed. Returns [T, D]."""
        spec, m = self.spec, lw.moe_index
        recording = any(span.record is not None for span in spans)
        next_routing = None
        if m + 1 < spec.num_moe_layers and (self.experts.wants_lookahead or recording):
            next_routing = LayerRouting(self._route_next(h, m + 1), None, spec.num_experts)
        routing = LayerRouting(ids, weights, spec.num_experts)
        self._trace(m, routing, next_routing, spans)
        experts = self.experts.acquire(m, routing, next_routing if self.experts.wants_lookahead else None)
        y = self.kernels.moe_experts(
            x, ids, weights, experts.w13, experts.w2, experts.slots,
            b13=experts.b13, b2=experts.b2, activation=spec.expert_activation, host=experts.host,
            input_perm=experts.input_perm,
        )  # fmt: skip
        self.experts.release(m)
        return y

    def _route(self, lw: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> ids, weights [T, K]."""
        logits = F.linear(x.to(lw.router.dtype), lw.router, lw.router_bias)  # [T, E]
        return route(logits, self.spec, self.kernels, lw.router_correction_bias)

    def _route_next(self, h: torch.Tensor, moe_index: int) -> torch.Tensor:
        """[T, K] experts that MoE layer `moe_index`'s router would pick from the residual stream
        h [T, D] of an earlier layer (the next layer's routing, guessed a layer ahead)."""
        lw = self.dense.layers[self.spec.moe_layers[moe_index]]
        ids, _ = self._route(lw, self._norm(h, lw.ffn_norm, lw.ffn_norm_bias))
        return ids

    @staticmethod
    def _trace(moe_index: int, routing: LayerRouting, next_routing: LayerRouting | None, spans: list[Span]) -> None:
        """Counts each span's routing at MoE layer `moe_index` into its EAM and, when recording,
        keeps it per token (next_routing: the next MoE layer's guess)."""
        if all(span.eam is None and span.record is None for span in spans):
            return
        ids = routing.host_ids()  # [T, K]
        offset = 0
        for span in spans:
            rows = slice(offset, offset + span.count)
            if span.eam is not None:
                span.eam.add(span.phase, moe_index, ids[rows])
            if span.record is not None:
                span.record.experts[:, moe_index] = ids[rows]
                span.record.weights[:, moe_index] = routing.weights[rows].float().cpu().numpy()
                if next_routing is not None:
                    span.record.lookahead[:, moe_index] = next_routing.host_ids()[rows]
            offset += span.count
