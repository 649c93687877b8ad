"""Scheduler: continuous batching over one LLM's executor, a step at a time.

The scheduler holds the running sequences, each with its own KV cache, sampling settings and
random generator. start() adds a sequence between steps, cancel() drops one; step() advances every
running sequence once:

    decode     every sequence past its prompt feeds its last token (groups of at most
               max_batch_tokens sequences, one forward each)
    prefill    the sequences still in their prompt feed the next chunk of it, in arrival order,
               max_batch_tokens in all: in the room the last decode group leaves, else in a
               forward of their own; a sequence samples its first token once its prompt is in

so a long prompt arriving mid-generation costs the decoders a chunk a step, not the whole prompt.
Tokens of one forward share one flat axis through norms, projections, router and experts; only
attention runs per sequence. Each sequence samples from its own rows with its own generator, so a
seeded sequence's tokens do not depend on what it ran beside. A sequence leaves at once when it
finishes (end of sequence or max_new_tokens) or is cancelled.

The scheduler is not thread-safe: its owner (LLM) steps it under a lock. Its callbacks run on the
thread that steps, between forwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from moeinf.models.spec import ModelSpec
from moeinf.runtime.cache.eam import DECODE, PREFILL, SequenceEAM
from moeinf.runtime.executor import Executor, Span
from moeinf.runtime.experts.source import ExpertSource
from moeinf.runtime.routing_record import RoutingRecord
from moeinf.runtime.sampling import SamplingParams, sample_next
from moeinf.runtime.traces import TraceBuilder

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
CANCELLED = "cancelled"  # finish_reason of a sequence dropped before it finished


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str | None  # None when the checkpoint has no tokenizer
    finish_reason: str  # "eos", "length", or "cancelled" (submit(): its handle was cancelled)


@dataclass(eq=False)
class RunningSequence:
    """One sequence in the scheduler. on_token(sequence, token, finish_reason) is called for every
    generated token, finish_reason None but for its last; on_end(sequence) once it leaves (finished,
    cancelled, or failed: then `error` is set)."""

    key: int  # names the sequence in a recorded trace
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    span: Span | None  # None once it left: its KV cache goes with it
    on_token: Callable[[RunningSequence, int, Union[str, None]], None] | None = None
    on_end: Callable[[RunningSequence], None] | None = None
    trace: TraceBuilder | None = None
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # prompt tokens in the KV cache
    finish_reason: str | None = None  # "eos", "length" or CANCELLED once it left
    error: BaseException | None = None  # the failure of the step it was in, if one failed

    @property
    def in_prompt(self) -> bool:
        return self.fed < len(self.prompt)


class Scheduler:
    """The running sequences of one executor. stats: tokens and seconds by phase, and the expert
    traffic by phase (a forward with any prompt tokens counts as prefill)."""

    def __init__(self, spec: ModelSpec, executor: Executor, experts: ExpertSource, max_batch_tokens: int | None):
        self.spec, self.executor, self.experts = spec, executor, experts
        self.max_batch_tokens = max_batch_tokens  # tokens one forward may carry (None: no limit)
        self.running: list[RunningSequence] = []  # in arrival order
        self._started = 0
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
        self.stats.update({f"{phase}_{key}": 0 for phase in ("prefill", "decode") for key in PHASE_COUNTERS})
        self._traffic_mark = experts.stats.snapshot()

    def start(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_token: Callable[[RunningSequence, int, Union[str, None]], None] | None = None,
        on_end: Callable[[RunningSequence], None] | None = None,
        trace: TraceBuilder | None = None,
    ) -> RunningSequence:
        """Adds a checked prompt (LLM.prompt_ids) to the running batch; it feeds from the next step.
        The first sequence of an idle scheduler begins a new batch for the offloading policy."""
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        # the routing counts only an offloading policy learns from; counting them costs a
        # device-to-host copy at every MoE layer
        spec = self.spec
        eam = SequenceEAM(spec.num_moe_layers, spec.num_experts) if self.experts.tracks_routing else None
        span = Span(self.executor.new_cache(len(prompt) + params.max_new_tokens), 0, eam, PREFILL)
        sequence = RunningSequence(self._started, prompt, params, generator, span, on_token, on_end, trace)
        self._started += 1
        if not self.running:
            self.experts.begin_batch()
        self.running.append(sequence)
        return sequence

    def cancel(self, sequence: RunningSequence) -> None:
        """Drops a sequence between steps (finish_reason CANCELLED); a finished one stays as it is."""
        if sequence in self.running:
            sequence.finish_reason = CANCELLED
            self._leave(sequence)

    def step(self) -> None:
        """Advances every running sequence once (see the module docstring). If a forward fails,
        every running sequence leaves with the error, and it is raised."""
        decoders = [s for s in self.running if not s.in_prompt]
        prompts = [s for s in self.running if s.in_prompt]
        limit = self.max_batch_tokens or max(1, len(decoders) + sum(len(s.prompt) - s.fed for s in prompts))
        groups = [[(s, 1) for s in decoders[i : i + limit]] for i in range(0, len(decoders), limit)]
        joins_last = bool(groups) and len(groups[-1]) < limit  # the prompts' chunk rides with the last group
        room = limit - len(groups[-1]) if joins_last else limit
        chunk = []
        for s in prompts:
            if room == 0:
                break
            count = min(len(s.prompt) - s.fed, room)
            chunk.append((s, count))
            room -= count
        if chunk and joins_last:
            groups[-1].extend(chunk)
        elif chunk:
            groups.append(chunk)
        try:
            for group in groups:
                self._forward(group)
        except BaseException as error:
            for sequence in list(self.running):
                sequence.error = error
                self._leave(sequence)
            raise

    def _forward(self, group: list[tuple[RunningSequence, int]]) -> None:
        """One forward over `group`: [(sequence, tokens it feeds)], decode tokens first."""
        prefill = 0
        tokens, sampling, row = [], [], -1  # sampling: [(sequence, its last row)] of those that sample
        for s, count in group:
            s.span.count = count
            if s.in_prompt:
                s.span.phase = PREFILL
                tokens.extend(s.prompt[s.fed : s.fed + count])
                prefill += count
                s.fed += count
            else:
                s.span.phase = DECODE
                tokens.append(s.generated[-1])
            row += count
            if not s.in_prompt:  # a decoder, or a prompt fed to its end: samples this step
                sampling.append((s, row))
            s.span.record = None if s.trace is None else RoutingRecord(count, self.spec.num_moe_layers, self.spec.top_k)
        device = self.executor.device
        every_row = len(sampling) == len(tokens)
        rows = None if every_row else torch.tensor([r for _, r in sampling], dtype=torch.int64, device=device)
        start = time.perf_counter()
        logits = self.executor.forward(torch.tensor(tokens, device=device), [s.span for s, _ in group], rows).cpu()
        for s, _ in group:
            if s.trace is not None:
                record = s.span.record
                s.trace.add_tokens(s.key, record.experts, record.weights, s.span.phase, record.lookahead)
                s.span.record = None
        phase = "prefill" if prefill else "decode"
        self.stats[f"{phase}_s"] += time.perf_counter() - start
        self.stats["prefill_tokens"] += prefill
        self.stats["decode_tokens"] += len(tokens) - prefill
        self._count_phase_traffic(phase)
        if sampling:
            self._accept([s for s, _ in sampling], self._sample(logits, [s for s, _ in sampling]))

    @staticmethod
    def _sample(logits: torch.Tensor, sequences: list[RunningSequence]) -> list[int]:
        """logits: [R, V] float32, row i sequence i's -> one token per sequence, each sampled with
        its own settings and generator."""
        if all(s.params.greedy for s in sequences):
            return logits.argmax(dim=-1).tolist()
        return [sample_next(logits[i : i + 1], s.params, s.generator)[0] for i, s in enumerate(sequences)]

    def _accept(self, sequences: list[RunningSequence], next_tokens: list[int]) -> None:
        for s, token in zip(sequences, next_tokens):
            s.generated.append(token)
            reason = None
            if token in self.spec.eos_token_ids and not s.params.ignore_eos:
                reason = "eos"
            elif len(s.generated) >= s.params.max_new_tokens:
                reason = "length"
            s.finish_reason = reason
            if s.on_token is not None:
                s.on_token(s, token, reason)
            if reason is not None:
                if s.span.eam is not None:
                    self.experts.sequence_finished(s.span.eam.total())
                self._leave(s)

    def _leave(self, sequence: RunningSequence) -> None:
        self.running.remove(sequence)
        if sequence.trace is not None and sequence.fed:  # it added tokens to the trace
            sequence.trace.finish(sequence.key)
        sequence.span = None
        if sequence.on_end is not None:
            sequence.on_end(sequence)

    def _count_phase_traffic(self, phase: str) -> None:
        """Adds the expert traffic since the last call to `phase`'s counters (prefill_misses, ...)."""
        now = self.experts.stats.snapshot()
        for key in PHASE_COUNTERS:
            self.stats[f"{phase}_{key}"] += now[key] - self._traffic_mark[key]
        self._traffic_mark = now
