"""LLM: the public entry point. Opens a checkpoint, loads it, and generates for batches of prompts."""

from __future__ import annotations

import operator
import threading
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from moeinf.errors import LLMClosedError, OffloadConfigError, RequestError, TokenizerError
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.tokenizer import TextCodec
from moeinf.runtime.cache.policy import CachePolicy
from moeinf.runtime.cache.registry import DEFAULT_POLICY
from moeinf.runtime.engine_loop import EngineLoop, Event, RequestHandle
from moeinf.runtime.executor import Executor, Span
from moeinf.runtime.sampling import SamplingParams
from moeinf.runtime.scheduler import RequestOutput, RunningSequence, Scheduler
from moeinf.runtime.setup import (
    Budget,
    OffloadConfig,
    build_expert_source,
    expert_format_for,
    resolve_device,
    resolve_dtype,
    resolve_kernels,
)
from moeinf.runtime.traces import TraceBuilder

Prompt = Union[str, Sequence[int]]
# on_token(prompt index, token id, finish reason or None): generate's per-token hook
TokenCallback = Callable[[int, int, Union[str, None]], None]


def token_ids(prompt: object) -> list[int]:
    """A prompt given as token ids -> a list of Python ints; RequestError for anything else."""
    try:
        items = list(prompt)
    except TypeError:
        raise RequestError(
            f"expected a prompt of text or of token ids (integers), found {type(prompt).__name__} {prompt!r:.80}"
        ) from None
    ids = []
    for item in items:
        # operator.index takes bools (True is 1), bool tensors too: refuse them first
        is_bool = isinstance(item, (bool, np.bool_)) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool)
        try:
            if is_bool:
                raise TypeError
            ids.append(operator.index(item))
        except TypeError:
            raise RequestError(
                f"expected prompt token ids to be integers, found {type(item).__name__} {item!r:.80} "
                f"at position {len(ids)}"
            ) from None
    return ids


class LLM:
    """Serves one checkpoint. Offloading settings come as keywords or as one OffloadConfig
    (offload=...); by default every expert stays resident on the compute device. `kernels` picks
    what runs norms, routing and experts (see resolve_kernels). `expert_dtype` the routed experts'
    format (loaders/expert_format.py): "auto" (the checkpoint's own quantized format, else the
    compute dtype), or "int8" / "int4" / "int4-g64" / "int4-g128", quantized round to nearest as the
    store (or the resident stack) is built; dense layers stay in the compute dtype."""

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        progress: bool = True,
        *,
        expert_budget: Budget = None,
        host_budget: Budget = "auto",
        offload_dir: str | Path | None = None,
        policy: str | CachePolicy = DEFAULT_POLICY,
        host_compute: str = "auto",
        offload: OffloadConfig | None = None,
        max_batch_tokens: int | None = None,
        kernels: str = "auto",
        expert_dtype: str = "auto",
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
        # how the routed experts are held and computed: the compute dtype, or int8 / int4 records
        self.expert_format = expert_format_for(self.checkpoint, expert_dtype, self.dtype)
        tokenizer_file = self.checkpoint.tokenizer_file
        self.codec = TextCodec(tokenizer_file) if tokenizer_file else None
        # where the executor finds each layer's experts, and the one it tells what each step routes
        self.experts = build_expert_source(
            self.checkpoint, self.offload, self.device, self.dtype, progress, max_batch_tokens, self.expert_format
        )
        self.executor = Executor(self.checkpoint, self.experts, self.device, self.dtype, self.kernels, progress)
        # the running batch, stepped under the lock by whichever thread steps (generate, or submit's loop)
        self.scheduler = Scheduler(self.spec, self.executor, self.experts, max_batch_tokens)
        self.step_lock = threading.Lock()  # held while a thread steps the scheduler (or runs logits)
        self._engine_loop: EngineLoop | None = None  # submit()'s, started on first use
        self._loop_lock = threading.Lock()  # guards starting it
        self._closed = False  # set by close()

    def encode(self, text: str) -> list[int]:
        if self.codec is None:
            raise TokenizerError(f"{self.checkpoint.path} has no tokenizer.json; pass prompts as token id lists")
        return self.codec.encode(text)

    def prompt_ids(self, prompt: Prompt, max_new_tokens: int = 0) -> list[int]:
        """A prompt (text, or token ids) as token ids, checked: not empty, ids integers (Python's,
        numpy's or 0-d integer tensors; not bools, not floats) in the vocabulary, and room in the
        model's positions for max_new_tokens more. Raises RequestError (TokenizerError for text
        without a tokenizer; LLMClosedError once close() ran: every use of the LLM checks its
        prompts here first)."""
        if self._closed:
            raise LLMClosedError("expected an open LLM, found one closed by close()")
        ids = self.encode(prompt) if isinstance(prompt, str) else token_ids(prompt)
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
        sequence's last token (streaming); it runs on the stepping thread, between steps. The
        prompts join the scheduler's running batch (runtime/scheduler.py), beside any that
        submit() started, and this thread steps it until they are done."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.prompt_ids(prompt, params.max_new_tokens) for prompt in prompts]  # all checked first
        if not ids:
            return []

        def report(place: int):
            if on_token is None:
                return None
            return lambda _sequence, token, reason: on_token(place, token, reason)

        with self.step_lock:
            sequences = [
                self.scheduler.start(prompt, params, on_token=report(place), trace=trace)
                for place, prompt in enumerate(ids)
            ]
        while any(s.span is not None for s in sequences):
            with self.step_lock:
                self.scheduler.step()
        failed = next((s.error for s in sequences if s.error is not None), None)
        if failed is not None:  # a step another thread ran failed with these sequences in it
            raise failed
        return [self.output(s) for s in sequences]

    def submit(
        self, prompt: Prompt, params: SamplingParams | None = None, listener: Callable[[Event], None] | None = None
    ) -> RequestHandle:
        """Starts one prompt on the LLM's engine loop (runtime/engine_loop.py: a thread that steps
        the running batch, started on first use) and returns at once: iterate the handle for its
        tokens as they come, .result() for its RequestOutput, .cancel() to drop it. Requests
        submitted from any thread batch together, continuously: each joins and leaves between
        decode steps."""
        if self._closed:
            raise LLMClosedError("expected an open LLM, found one closed by close()")
        with self._loop_lock:  # not the step lock: submit never waits for a step (or deadlocks in a listener)
            if self._engine_loop is None:
                self._engine_loop = EngineLoop(self)
        return self._engine_loop.submit(prompt, params, listener)

    @property
    def engine_loop(self) -> EngineLoop | None:
        """submit()'s loop, once started (None before)."""
        return self._engine_loop

    def start_engine_loop(self, max_running: int | None = None) -> EngineLoop:
        """Starts submit()'s loop with its own cap on running sequences (default: fitting_batch)."""
        with self._loop_lock:
            if self._engine_loop is not None:
                raise RequestError("expected no engine loop yet, found one already running")
            self._engine_loop = EngineLoop(self, max_running)
        return self._engine_loop

    def output(self, sequence: RunningSequence) -> RequestOutput:
        """What a sequence generated, decoded."""
        return RequestOutput(
            prompt_token_ids=sequence.prompt,
            token_ids=sequence.generated,
            text=self.codec.decode(sequence.generated) if self.codec else None,
            finish_reason=sequence.finish_reason,
        )

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-sequence forward from an empty cache: [T, vocab] float32 on the CPU."""
        ids = self.prompt_ids(token_ids)
        with self.step_lock:
            if not self.scheduler.running:  # a batch of its own: no routing state carried in from the last
                self.experts.begin_batch()
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
        return {
            **self.scheduler.stats,
            **self.experts.stats.snapshot(),
            "resident_experts": self.experts.resident_experts(),
        }

    def close(self) -> None:
        """Lets submitted requests finish, then stops the I/O workers and closes the expert store
        (offloaded runs). Afterwards generate, submit and logits raise LLMClosedError; stats()
        still reads. Closing again does nothing more."""
        if self._engine_loop is not None:  # outside the lock: its thread takes it to step
            self._engine_loop.close()
        with self.step_lock:  # a step running on another thread finishes first
            if not self._closed:
                self._closed = True
                self.experts.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
