"""LLM: the public entry point. Opens a checkpoint, loads it, and generates for batches of prompts."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch

from moeinf.errors import OffloadConfigError, RequestError, TokenizerError
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.default_model import cache_dir
from moeinf.loaders.expert_store import ExpertStore
from moeinf.loaders.tokenizer import TextCodec
from moeinf.runtime.budget import Budget, OffloadConfig, parse_budget
from moeinf.runtime.eam import DECODE, PREFILL, SequenceEAM
from moeinf.runtime.executor import Executor, ExpertSource, Span
from moeinf.runtime.expert_pool import ExpertPool
from moeinf.runtime.policies import CachePolicy, make_policy
from moeinf.runtime.resident_experts import ResidentExperts
from moeinf.runtime.sampling import SamplingParams, sample_next

Prompt = Union[str, Sequence[int]]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str | None  # None when the checkpoint has no tokenizer
    finish_reason: str  # "eos" or "length"


@dataclass
class _Running:
    prompt: list[int]
    span: Span
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device 'cuda' was requested, but torch sees no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise RequestError(f"expected device 'cpu' or 'cuda', found {str(device)!r}")
    return device


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """'auto' computes in float32 on the CPU and in the checkpoint's own dtype on CUDA."""
    if dtype == "auto":
        dtype = checkpoint_dtype if device.type == "cuda" and checkpoint_dtype in DTYPES else "float32"
    if dtype not in DTYPES:
        raise RequestError(f"expected dtype one of auto, {', '.join(DTYPES)}; found {dtype!r}")
    return DTYPES[dtype]


def default_store_dir(checkpoint: Checkpoint) -> Path:
    """One store folder per checkpoint folder, under the cache directory."""
    digest = hashlib.sha1(str(checkpoint.path.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "stores" / f"{checkpoint.path.name}-{digest}"


def build_expert_source(
    checkpoint: Checkpoint, offload: OffloadConfig, device: torch.device, dtype: torch.dtype, progress: bool
) -> tuple[ExpertSource, CachePolicy | None]:
    """Every expert resident when the budget affords them all; else a pool of slots over the store,
    run by the configured policy (returned too: the engine and executor tell it what happens)."""
    spec = checkpoint.spec
    total = spec.num_moe_layers * spec.num_experts
    expert_nbytes = spec.expert_params * torch.empty((), dtype=dtype).element_size()
    slots = parse_budget(offload.expert_budget, expert_nbytes, total, "expert_budget")
    policy = make_policy(offload.policy, spec.num_moe_layers, spec.num_experts)
    if slots >= total:
        return ResidentExperts(checkpoint, device, dtype, progress), None
    # A prefill batch can route tokens to every expert of a layer, and a layer computes only
    # with all its routed experts resident at once.
    minimum = spec.num_experts
    if slots < minimum:
        raise OffloadConfigError(
            f"expert_budget {offload.expert_budget!r} affords {slots} expert slots; the minimum is {minimum} "
            f"(all experts of one layer, {minimum * expert_nbytes / 2**20:.1f} MiB in {str(dtype).split('.')[-1]})"
        )
    host_records = parse_budget(offload.host_budget, expert_nbytes, total, "host_budget")
    if offload.io_threads < 1:
        raise OffloadConfigError(f"io_threads: expected >= 1, found {offload.io_threads}")
    store_dir = Path(offload.offload_dir) if offload.offload_dir else default_store_dir(checkpoint)
    store = ExpertStore.open_or_build(checkpoint, store_dir, dtype, progress=progress)
    return ExpertPool(store, slots, host_records, device, dtype, policy, offload.io_threads), policy


class LLM:
    """Serves one checkpoint. Offloading settings come as keywords or as one OffloadConfig
    (offload=...); by default every expert stays resident on the compute device."""

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
        policy: str | CachePolicy = "lru",
        offload: OffloadConfig | None = None,
    ):
        keywords = OffloadConfig(expert_budget, host_budget, offload_dir, policy)
        if offload is not None and keywords != OffloadConfig():
            raise OffloadConfigError("pass offloading settings either as keywords or as offload=OffloadConfig(...)")
        self.offload = offload or keywords
        self.checkpoint = Checkpoint.open(model)
        self.spec = self.checkpoint.spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.spec.torch_dtype, self.device)
        tokenizer_file = self.checkpoint.tokenizer_file
        self.codec = TextCodec(tokenizer_file) if tokenizer_file else None
        self.experts, self.policy = build_expert_source(
            self.checkpoint, self.offload, self.device, self.dtype, progress
        )
        self.executor = Executor(self.checkpoint, self.experts, self.policy, self.device, self.dtype, progress)
        self._stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    def encode(self, text: str) -> list[int]:
        if self.codec is None:
            raise TokenizerError(f"{self.checkpoint.path} has no tokenizer.json; pass prompts as token id lists")
        return self.codec.encode(text)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RequestError("expected a prompt of at least one token, found an empty one")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids must lie in [0, {self.spec.vocab_size}), found {bad[:5]}")
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generates for every prompt (text, or a list of token ids) in one batch."""
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
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            capacity = len(ids) + params.max_new_tokens
            if capacity > self.spec.max_position:
                raise RequestError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                    f"model's {self.spec.max_position} positions"
                )
            eam = SequenceEAM(self.spec.num_moe_layers, self.spec.num_experts)
            running.append(_Running(ids, Span(self.executor.new_cache(capacity), len(ids), eam, PREFILL)))
        if self.policy is not None:
            self.policy.begin_batch()

        start = time.perf_counter()
        tokens = torch.tensor([t for r in running for t in r.prompt], device=self.device)
        last_rows = torch.tensor([len(r.prompt) for r in running]).cumsum(0).sub(1).to(self.device)
        logits = self.executor.forward(tokens, [r.span for r in running], last_rows).cpu()
        self._accept(running, sample_next(logits, params, generator), params)
        self._stats["prefill_tokens"] += int(tokens.numel())
        self._stats["prefill_s"] += time.perf_counter() - start

        start = time.perf_counter()
        decoded = 0
        active = [r for r in running if r.finish_reason is None]
        while active:
            for r in active:
                r.span.count, r.span.phase = 1, DECODE
            tokens = torch.tensor([r.generated[-1] for r in active], device=self.device)
            logits = self.executor.forward(tokens, [r.span for r in active]).cpu()
            self._accept(active, sample_next(logits, params, generator), params)
            decoded += len(active)
            active = [r for r in active if r.finish_reason is None]
        self._stats["decode_tokens"] += decoded
        self._stats["decode_s"] += time.perf_counter() - start

        return [
            RequestOutput(
                prompt_token_ids=r.prompt,
                token_ids=r.generated,
                text=self.codec.decode(r.generated) if self.codec else None,
                finish_reason=r.finish_reason,
            )
            for r in running
        ]

    def _accept(self, running: list[_Running], next_tokens: list[int], params: SamplingParams) -> None:
        for r, token in zip(running, next_tokens):
            r.generated.append(token)
            if token in self.spec.eos_token_ids and not params.ignore_eos:
                r.finish_reason = "eos"
            elif len(r.generated) >= params.max_new_tokens:
                r.finish_reason = "length"
            if r.finish_reason is not None and self.policy is not None:
                self.policy.sequence_finished(r.span.eam.total())

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-sequence forward from an empty cache: [T, vocab] float32 on the CPU."""
        ids = self._prompt_ids(token_ids)
        span = Span(self.executor.new_cache(len(ids)), len(ids))
        return self.executor.forward(torch.tensor(ids, device=self.device), [span]).cpu()

    def stats(self) -> dict[str, float]:
        """Counters since this LLM was built: tokens and seconds in prefill and decode, and the
        expert traffic (hits, misses, prefetch_hits, prefetch_wasted, bytes_to_device,
        bytes_from_disk, stall_s, ...) with the number of experts resident now."""
        return {**self._stats, **self.experts.stats.snapshot(), "resident_experts": self.experts.resident_experts()}

    def close(self) -> None:
        """Stops the I/O workers and closes the expert store (offloaded runs)."""
        self.experts.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
