"""Batching: one generation thread owns the LLM, and waiting requests share its generate calls.

Requests are checked on the caller's thread (a bad one fails alone, before it joins a batch) and
queued. The generation thread takes the oldest waiting request and every other waiting one with the
same sampling settings, up to max_batch_prompts prompts, and runs them as one generate call: one
batch through the experts, each layer's GEMMs over all of their tokens. A request with a seed runs
alone, so that its sampled tokens do not depend on what it was batched with. Greedy tokens do not
depend on the batch (tests/runtime/test_generate.py: batch equals one prompt at a time).

How many prompts to batch depends on the expert budget. Offloaded, a step of B prompts routes to
the union of their experts; once that outgrows the slots, the batch reloads more than its batched
GEMMs save. So by default (max_batch_prompts=None) only as many prompts are batched as the slots
are expected to serve, fitting_batch, at most MAX_BATCH_PROMPTS (figures: bench/serve.py and
bench/results/serve-cpu.json).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from moeinf.errors import RequestError
from moeinf.runtime.engine import LLM
from moeinf.runtime.sampling import SamplingParams

MAX_BATCH_PROMPTS = 8  # prompts one generate call batches, at most, by default
# Decode steps of routing the slots should hold at once for a batch to pay: one step's experts and
# about half the next's, which its prompts route elsewhere. Fitted with bench/serve.py (default
# model, 25 / 50 / 75 / 100% budgets): at 1 a 2-prompt batch at 50% lost 13% to one prompt a call.
STEP_SPAN = 1.5


class ServerClosing(RuntimeError):
    """A request came in after the server began to stop; answered with 503."""


@dataclass
class Completion:
    """One request's work, waiting for the generation thread."""

    prompt_ids: list[list[int]]  # [prompts][tokens], checked against the model
    params: SamplingParams
    done: Future  # -> list[RequestOutput], one per prompt
    # streaming: (prompt index, token, finish reason) per token as generated, then None once done
    events: queue.SimpleQueue | None = None


def fitting_batch(num_layers: int, num_experts: int, top_k: int, slots: int, cap: int = MAX_BATCH_PROMPTS) -> int:
    """The most prompts (1 .. cap) whose routing over STEP_SPAN decode steps is expected to need no
    more experts than `slots` hold: n routings a layer reach E * (1 - (1 - k / E)^(n / k)) distinct
    experts when routing is uniform and independent (real routing repeats itself more, so this errs
    on the small side); B prompts make B * STEP_SPAN tokens' worth."""
    best = 1
    for batch in range(2, cap + 1):
        if num_layers * num_experts * (1.0 - (1.0 - top_k / num_experts) ** (batch * STEP_SPAN)) > slots:
            break
        best = batch
    return best


class Batcher:
    """The waiting requests and the generation thread. start() starts the thread (requests
    submitted before it wait, and batch together); close() answers what is queued, then stops it."""

    def __init__(self, llm: LLM, max_batch_prompts: int | None = None):
        if max_batch_prompts is None:  # as many as the expert slots serve without thrashing
            spec = llm.spec
            max_batch_prompts = fitting_batch(spec.num_moe_layers, spec.num_experts, spec.top_k, llm.experts.num_slots)
        if isinstance(max_batch_prompts, bool) or not isinstance(max_batch_prompts, int) or max_batch_prompts < 1:
            raise RequestError(f"max_batch_prompts: expected an integer >= 1, found {max_batch_prompts!r}")
        self.llm, self.max_batch_prompts = llm, max_batch_prompts
        self.batch_sizes: list[int] = []  # prompts per generate call, in order: what batching did
        self._waiting: deque[Completion] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._generate_loop, name="moeinf-generate", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def submit(self, prompts: list, params: SamplingParams, stream: bool = False) -> Completion:
        """Checks each prompt against the model (RequestError here, before it joins a batch) and
        queues the request; its future gives one RequestOutput per prompt, and with stream its
        events queue gets each token as it is generated."""
        ids = [self.llm.prompt_ids(p, params.max_new_tokens) for p in prompts]
        work = Completion(ids, params, Future(), queue.SimpleQueue() if stream else None)
        with self._cv:
            if self._stopping:
                raise ServerClosing("expected a running server, found one shutting down")
            self._waiting.append(work)
            self._cv.notify()
        return work

    def _next_batch(self) -> list[Completion]:
        """Blocks for the oldest waiting request; takes along the waiting ones it can share a
        generate call with. Empty once the server stops."""
        with self._cv:
            while not self._waiting and not self._stopping:
                self._cv.wait()
            if not self._waiting:
                return []
            first = self._waiting.popleft()
            batch, size = [first], len(first.prompt_ids)
            if first.params.seed is None:
                for work in list(self._waiting):
                    fits = size + len(work.prompt_ids) <= self.max_batch_prompts
                    if work.params == first.params and fits:
                        self._waiting.remove(work)
                        batch.append(work)
                        size += len(work.prompt_ids)
            return batch

    def _generate_loop(self) -> None:
        while batch := self._next_batch():
            prompts = [ids for work in batch for ids in work.prompt_ids]
            owners = [(work, i) for work in batch for i in range(len(work.prompt_ids))]  # [prompts]
            self.batch_sizes.append(len(prompts))

            def on_token(place: int, token: int, reason: str | None) -> None:
                work, i = owners[place]
                if work.events is not None:
                    work.events.put((i, token, reason))

            try:
                outputs = self.llm.generate(prompts, batch[0].params, on_token=on_token)
            except BaseException as error:  # noqa: BLE001 - handed to every request of the batch
                for work in batch:
                    work.done.set_exception(error)
            else:
                for work in batch:
                    work.done.set_result(outputs[: len(work.prompt_ids)])
                    outputs = outputs[len(work.prompt_ids) :]
            for work in batch:
                if work.events is not None:
                    work.events.put(None)

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._worker.is_alive():
            self._worker.join()
