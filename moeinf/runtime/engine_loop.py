"""EngineLoop: continuous batching on a thread of its own. submit() from any thread; the loop
steps the LLM's scheduler while any request runs, a step at a time.

Between steps the loop admits waiting requests into the running batch, oldest first, while fewer
than max_running run, and drops the cancelled ones; a request that finishes leaves at once. The
cap keeps a step's experts within what the slots serve: offloaded, B running sequences route to
the union of their experts, and once that outgrows the slots a step reloads more than its batched
GEMMs save (fitting_batch; figures: bench/serve.py and bench/results/serve-cpu.json).

    handle = loop.submit(prompt_ids, params)      # RequestHandle
    for token, finish_reason in handle: ...       # as generated (blocks), finish_reason on the last
    handle.result()                               # RequestOutput, once finished
    handle.cancel()                               # leaves at the next step, finish_reason "cancelled"
                                                  # (its stream just ends: result() says why)
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable, Iterator, Union

from moeinf.errors import LLMClosedError, RequestError
from moeinf.runtime.sampling import SamplingParams
from moeinf.runtime.scheduler import CANCELLED, RequestOutput, RunningSequence

if TYPE_CHECKING:
    from moeinf.runtime.engine import LLM

MAX_RUNNING = 8  # sequences one step carries, at most, by default
# Decode steps of routing the slots should hold at once for a batch to pay: one step's experts and
# about half the next's, which its prompts route elsewhere. Fitted with bench/serve.py (default
# model, 25 / 50 / 75 / 100% budgets): at 1 a 2-prompt batch at 50% lost 13% to one prompt a call.
STEP_SPAN = 1.5
# a request's events: (token, finish_reason or None) per generated token, then None once it left
Event = Union[tuple[int, Union[str, None]], None]


class EngineClosing(LLMClosedError):
    """A request came in after its engine loop began to stop (its LLM closing, or its server)."""


def fitting_batch(num_layers: int, num_experts: int, top_k: int, slots: int, cap: int = MAX_RUNNING) -> int:
    """The most sequences (1 .. cap) whose routing over STEP_SPAN decode steps is expected to need
    no more experts than `slots` hold: n routings a layer reach E * (1 - (1 - k / E)^(n / k))
    distinct experts when routing is uniform and independent (real routing repeats itself more,
    so this errs on the small side); B sequences make B * STEP_SPAN tokens' worth."""
    best = 1
    for batch in range(2, cap + 1):
        if num_layers * num_experts * (1.0 - (1.0 - top_k / num_experts) ** (batch * STEP_SPAN)) > slots:
            break
        best = batch
    return best


class RequestHandle:
    """One submitted request. Its events go to `listener` when one is given (called on the
    stepping thread: keep it short), else to a queue that iterating the handle reads."""

    def __init__(
        self, prompt: list[int], params: SamplingParams, loop: EngineLoop, listener: Callable[[Event], None] | None
    ):
        self.prompt_token_ids, self.params = prompt, params
        self.done: Future = Future()  # -> RequestOutput
        self._loop = loop
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._listener = listener or self._events.put
        self.sequence: RunningSequence | None = None  # set once admitted
        self.cancelled = False

    def cancel(self) -> None:
        """Asks the loop to drop the request at its next step (no-op once it finished)."""
        self._loop.cancel(self)

    def result(self, timeout: float | None = None) -> RequestOutput:
        return self.done.result(timeout)

    def __iter__(self) -> Iterator[tuple[int, str | None]]:
        """(token, finish_reason) as each is generated; raises what failed the request, if it failed."""
        while (event := self._events.get()) is not None:
            yield event
        error = self.done.exception()
        if error is not None:
            raise error

    def _emit(self, event: Event) -> None:
        """Hands an event to the listener; one that raises cancels its own request (at the next
        step), never the steps of the requests beside it."""
        try:
            self._listener(event)
        except Exception:  # noqa: BLE001 - the listener's own failure: its request stops
            self.cancelled = True


class EngineLoop:
    """The loop thread over one LLM. close() lets what runs and waits finish, then stops it."""

    def __init__(self, llm: LLM, max_running: int | None = None):
        if max_running is None:  # as many as the expert slots serve without thrashing
            spec = llm.spec
            max_running = fitting_batch(spec.num_moe_layers, spec.num_experts, spec.top_k, llm.experts.num_slots)
        if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
            raise RequestError(f"max_running: expected an integer >= 1, found {max_running!r}")
        self.llm, self.max_running = llm, max_running
        self.batch_sizes: list[int] = []  # sequences running at each step, in order: what batching did
        self._waiting: deque[RequestHandle] = deque()
        self._active: list[RequestHandle] = []  # admitted, not yet left
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="moeinf-engine", daemon=True)
        self._thread.start()

    def submit(
        self, prompt, params: SamplingParams | None = None, listener: Callable[[Event], None] | None = None
    ) -> RequestHandle:
        """Checks the prompt (text or token ids; RequestError here, on the caller's thread) and
        queues it. Raises EngineClosing once close() began."""
        params = params or SamplingParams()
        handle = RequestHandle(self.llm.prompt_ids(prompt, params.max_new_tokens), params, self, listener)
        with self._cv:
            if self._stopping:
                raise EngineClosing("expected a running engine, found one shutting down")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            if handle in self._waiting:  # never started: it leaves now
                self._waiting.remove(handle)
                self._finish(handle, None)
                return
            handle.cancelled = True
            self._cv.notify()

    def close(self) -> None:
        """Answers what runs and waits, then stops the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._active and not self._stopping:
                    self._cv.wait()
                if not self._waiting and not self._active:
                    return  # stopping, and nothing left
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_running:
                    admitted.append(self._waiting.popleft())
                self._active.extend(admitted)
                cancelled = [h for h in self._active if h.cancelled]
            # the LLM's lock is never taken while holding _cv: its callbacks take _cv under it
            with self.llm.step_lock:
                for handle in admitted:
                    try:
                        handle.sequence = self.llm.scheduler.start(
                            handle.prompt_token_ids, handle.params, self._on_token(handle), self._on_end(handle)
                        )
                    except Exception as error:  # noqa: BLE001 - e.g. no memory for its KV cache: it alone fails
                        with self._cv:
                            self._active.remove(handle)
                        handle.done.set_exception(error)
                        handle._emit(None)
                for handle in cancelled:
                    self.llm.scheduler.cancel(handle.sequence)
                if not self.llm.scheduler.running:
                    continue
                self.batch_sizes.append(len(self.llm.scheduler.running))
                try:
                    self.llm.scheduler.step()
                except Exception:  # noqa: BLE001 - the failed sequences' handles carry it (on_end)
                    continue

    @staticmethod
    def _on_token(handle: RequestHandle) -> Callable:
        return lambda _sequence, token, reason: handle._emit((token, reason))

    def _on_end(self, handle: RequestHandle) -> Callable:
        def end(sequence: RunningSequence) -> None:
            with self._cv:
                self._active.remove(handle)
            self._finish(handle, sequence)

        return end

    def _finish(self, handle: RequestHandle, sequence: RunningSequence | None) -> None:
        if handle.done.cancelled():  # its waiter gave up on the future (Future.cancel): nothing to answer
            pass
        elif sequence is not None and sequence.error is not None:
            handle.done.set_exception(sequence.error)
        elif sequence is not None:
            handle.done.set_result(self.llm.output(sequence))
        else:  # cancelled while it waited
            text = "" if self.llm.codec else None
            handle.done.set_result(RequestOutput(handle.prompt_token_ids, [], text, CANCELLED))
        handle._emit(None)
