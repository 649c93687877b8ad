"""LLM: the public entry point. Opens a checkpoint, loads it, and generates for batches of prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from moeinf.errors import OffloadConfigError, RequestError, TokenizerError
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.tokenizer import TextCodec
from moeinf.runtime.cache.eam import DECODE, PREFILL, SequenceEAM
from moeinf.runtime.cache.policy import CachePolicy
from moeinf.runtime.cache.registry import DEFAULT_POLICY
from moeinf.runtime.executor import Executor, Span
from moeinf.runtime.routing_record import RoutingRecord
from moeinf.runtime.sampling import SamplingParams, sample_next
from moeinf.runtime.setup import (
    Budget,
    OffloadConfig,
    build_expert_source,
    resolve_device,
    resolve_dtype,
    resolve_kernels,
)
from moeinf.runtime.traces import TraceBuilder

Prompt = Union[str, Sequence[int]]
# on_token(prompt index, token id, finish reason or None): generate's per-token hook
TokenCallback = Callable[[int, int, Union[str, None]], None]
# expert traffic also counted per phase in stats(), e.g. decode_stall_s
PHASE_COUNTERS = (
    "hits",
    "misses",
    "host_computed",
    "prefetch_hits",
    "prefetch_late",
    "stall_s",
    "bytes_to_device",
    "bytes_from_disk",
)


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str | None  # None when the checkpoint has no tokenizer
    finish_reason: str  # "eos" or "length"


@dataclass
class _Running:
    key: int  # names the sequence in a recorded trace
    place: int  # the prompt's index in its generate call
    prompt: list[int]
    span: Span
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class LLM:
    """Serves one checkpoint. Offloading settings come as keywords or as one OffloadConfig
    (offload=...); by default every expert stays resident on the compute device. `kernels` picks
    what runs norms, routing and experts (see resolve_kernels)."""

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        progress: bool = True,
        *,
        expert_budget: Budget = None,
        host_budget: Budget = 0,
        offload_dir: str | Path | None = None,
        policy: str | CachePolicy = DEFAULT_POLICY,
        host_compute: str = "auto",
        offload: OffloadConfig | None = None,
        max_batch_tokens: int | None = None,
        kernels: str = "auto",
    ):
        keywords = OffloadConfig(expert_budget, host_budget, offload_dir, policy, host_compute=host_compute)
        if offload is not None and keywords != OffloadConfig():
            raise OffloadConfigError("pass offloading settings either as keywords or as offload=OffloadConfig(...)")
        self.offload = offload or keywords
        if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or max_batch_tokens < 1):
            raise RequestError(f"max_batch_tokens: expected a positive token count or None, found {max_batch_tokens!r}")
        # tokens one forward step may carry: prompts are prefilled in chunks and decode batches
        # split to fit, which bounds activations and how many experts one layer can need at once
        self.max_batch_tokens = max_batch_tokens
        self.checkpoint = Checkpoint.open(model)
        self.spec = self.checkpoint.spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.spec.torch_dtype, self.device)
        self.kernels = resolve_kernels(kernels, self.device)
        tokenizer_file = self.checkpoint.tokenizer_file
        self.codec = TextCodec(tokenizer_file) if tokenizer_file else None
        # where the executor finds each layer's experts, and the one it tells what each step routes
        self.experts = build_expert_source(
            self.checkpoint, self.offload, self.device, self.dtype, progress, max_batch_tokens
        )
        self.executor = Executor(self.checkpoint, self.experts, self.device, self.dtype, self.kernels, progress)
        self._sequences_started = 0
        self._stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
        self._stats.update({f"{phase}_{key}": 0 for phase in ("prefill", "decode") for key in PHASE_COUNTERS})
        self._traffic_mark = self.experts.stats.snapshot()

    def encode(self, text: str) -> list[int]:
        if self.codec is None:
            raise TokenizerError(f"{self.checkpoint.path} has no tokenizer.json; pass prompts as token id lists")
        return self.codec.encode(text)

    def prompt_ids(self, prompt: Prompt, max_new_tokens: int = 0) -> list[int]:
        """A prompt (text, or token ids) as token ids, checked: not empty, ids in the vocabulary, and
        room in the model's positions for max_new_tokens more. Raises RequestError (TokenizerError
        for text without a tokenizer)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RequestError("expected a prompt of at least one token, found an empty one")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids must lie in [0, {self.spec.vocab_size}), found {bad[:5]}")
        if len(ids) + max_new_tokens > self.spec.max_position:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's {self.spec.max_position} positions"
            )
        return ids

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        trace: TraceBuilder | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text, or a list of token ids) in one batch. With `trace`,
        every token's routing (experts, weights, next-layer lookahead) goes into it, one trace
        sequence per prompt. on_token(i, token, finish_reason) is called for every token as it is
        generated, i the index of its prompt in `prompts` and finish_reason None but for a
        sequence's last token (streaming); it runs on the generating thread, between steps."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        running = []
        for place, prompt in enumerate(prompts):
            ids = self.prompt_ids(prompt, params.max_new_tokens)
            capacity = len(ids) + params.max_new_tokens
            # the routing counts only an offloading policy learns from; counting them costs a
            # device-to-host copy at every MoE layer
            eam = SequenceEAM(self.spec.num_moe_layers, self.spec.num_experts) if self.experts.tracks_routing else None
            self._sequences_started += 1
            running.append(
                _Running(
                    self._sequences_started - 1,
                    place,
                    ids,
                    Span(self.executor.new_cache(capacity), len(ids), eam, PREFILL),
                )
            )
        self.experts.begin_batch()

        start = time.perf_counter()
        for step in self._prefill_steps(running):
            tokens = torch.tensor([t for r, begin in step for t in r.prompt[begin : begin + r.span.count]])
            ends = [
                (r, int(row))
                for (r, begin), row in zip(step, self._last_rows(step))
                if begin + r.span.count == len(r.prompt)
            ]
            rows = torch.tensor([row for _, row in ends], dtype=torch.int64, device=self.device)
            self._start_records(trace, [r for r, _ in step])
            logits = self.executor.forward(tokens.to(self.device), [r.span for r, _ in step], rows).cpu()
            self._keep_records(trace, [r for r, _ in step])
            if ends:  # a step that only feeds the middle of prompts samples nothing
                self._accept([r for r, _ in ends], sample_next(logits, params, generator), params, on_token)
        self._stats["prefill_tokens"] += sum(len(r.prompt) for r in running)
        self._stats["prefill_s"] += time.perf_counter() - start
        self._count_phase_traffic("prefill")

        start = time.perf_counter()
        decoded = 0
        active = [r for r in running if r.finish_reason is None]
        while active:
            for group in self._groups(active):
                for r in group:
                    r.span.count, r.span.phase = 1, DECODE
                tokens = torch.tensor([r.generated[-1] for r in group], device=self.device)
                self._start_records(trace, group)
                logits = self.executor.forward(tokens, [r.span for r in group]).cpu()
                self._keep_records(trace, group)
                self._accept(group, sample_next(logits, params, generator), params, on_token)
                decoded += len(group)
            active = [r for r in active if r.finish_reason is None]
        self._stats["decode_tokens"] += decoded
        self._stats["decode_s"] += time.perf_counter() - start
        self._count_phase_traffic("decode")
        if trace is not None:
            for r in running:
                trace.finish(r.key)

        return [
            RequestOutput(
                prompt_token_ids=r.prompt,
                token_ids=r.generated,
                text=self.codec.decode(r.generated) if self.codec else None,
                finish_reason=r.finish_reason,
            )
            for r in running
        ]

    def _prefill_steps(self, running: list[_Running]):
        """Yields prefill steps, each [(sequence, first prompt position)] with span.count set to
        how many prompt tokens it feeds, at most max_batch_tokens in all."""
        limit = self.max_batch_tokens or sum(len(r.prompt) for r in running)
        done = {id(r): 0 for r in running}
        while True:
            step, room = [], limit
            for r in running:
                left = len(r.prompt) - done[id(r)]
                if left and room:
                    r.span.count = min(left, room)
                    step.append((r, done[id(r)]))
                    room -= r.span.count
            if not step:
                return
            yield step
            for r, begin in step:
                done[id(r)] = begin + r.span.count

    @staticmethod
    def _last_rows(step) -> list[int]:
        """Row of each span's last token on the step's flat token axis."""
        return torch.tensor([r.span.count for r, _ in step]).cumsum(0).sub(1).tolist()

    def _count_phase_traffic(self, phase: str) -> None:
        """Adds the expert traffic since the last call to `phase`'s counters (prefill_misses, ...)."""
        now = self.experts.stats.snapshot()
        for key in PHASE_COUNTERS:
            self._stats[f"{phase}_{key}"] += now[key] - self._traffic_mark[key]
        self._traffic_mark = now

    def _start_records(self, trace: TraceBuilder | None, step: list[_Running]) -> None:
        for r in step:
            r.span.record = (
                None if trace is None else RoutingRecord(r.span.count, self.spec.num_moe_layers, self.spec.top_k)
            )

    @staticmethod
    def _keep_records(trace: TraceBuilder | None, step: list[_Running]) -> None:
        if trace is None:
            return
        for r in step:
            record = r.span.record
            trace.add_tokens(r.key, record.experts, record.weights, r.span.phase, record.lookahead)
            r.span.record = None

    def _groups(self, active: list[_Running]) -> list[list[_Running]]:
        """Decode batches of at most max_batch_tokens sequences."""
        size = self.max_batch_tokens or len(active)
        return [active[i : i + size] for i in range(0, len(active), size)]

    def _accept(
        self,
        running: list[_Running],
        next_tokens: list[int],
        params: SamplingParams,
        on_token: TokenCallback | None,
    ) -> None:
        for r, token in zip(running, next_tokens):
            r.generated.append(token)
            if token in self.spec.eos_token_ids and not params.ignore_eos:
                r.finish_reason = "eos"
            elif len(r.generated) >= params.max_new_tokens:
                r.finish_reason = "length"
            if on_token is not None:
                on_token(r.place, token, r.finish_reason)
            if r.finish_reason is not None and r.span.eam is not None:
                self.experts.sequence_finished(r.span.eam.total())

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-sequence forward from an empty cache: [T, vocab] float32 on the CPU."""
        ids = self.prompt_ids(token_ids)
        self.experts.begin_batch()  # a batch of its own: no routing state carried in from the last
        span = Span(self.executor.new_cache(len(ids)), len(ids))
        return self.executor.forward(torch.tensor(ids, device=self.device), [span]).cpu()

    @property
    def policy(self) -> CachePolicy | None:
        """The offloading policy (None when every expert is resident), for inspection: its EAM
        collection holds what it learned (policy.eamc.save(path)). Only the expert source's cache
        controller calls it."""
        return self.experts.policy

    def stats(self) -> dict[str, float]:
        """Counters since this LLM was built: tokens and seconds in prefill and decode, and the
        expert traffic (hits, misses, prefetch_hits, prefetch_wasted, bytes_to_device,
        bytes_from_disk, stall_s, ...), the main ones also per phase (prefill_misses,
        decode_stall_s, ...). resident_experts is not a counter: the experts resident now."""
        return {**self._stats, **self.experts.stats.snapshot(), "resident_experts": self.experts.resident_experts()}

    def close(self) -> None:
        """Stops the I/O workers and closes the expert store (offloaded runs)."""
        self.experts.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
