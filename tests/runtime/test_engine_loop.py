"""The continuous-batching engine loop: LLM.submit, RequestHandle, EngineLoop and fitting_batch."""

import threading

import pytest

from moeinf import LLM, SamplingParams
from moeinf.errors import LLMClosedError, RequestError
from moeinf.runtime.engine_loop import fitting_batch
from tests.checkpoints import save_tiny_mixtral

WAIT = 60  # seconds any blocking wait may take before the test fails instead of hanging
PROMPTS = [[5, 9, 13], [21, 34, 55, 89, 44, 33, 22, 11], [17]]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-loop")
    save_tiny_mixtral(folder, seed=21)
    return folder


def open_llm(folder, **kwargs) -> LLM:
    return LLM(folder, device="cpu", dtype="float32", progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(folder):
    """An LLM that only ever generates one prompt at a time (no engine loop): the expected tokens."""
    llm = open_llm(folder)
    yield lambda prompt, params: llm.generate([prompt], params)[0].token_ids
    llm.close()


class Gate:
    """A listener that holds the stepping thread at a request's first token until open() is
    called, so that what is submitted meanwhile is surely waiting at the next step."""

    def __init__(self):
        self.reached, self.opened = threading.Event(), threading.Event()
        self.events = []

    def __call__(self, event):
        self.events.append(event)
        if len(self.events) == 1:
            self.reached.set()
            assert self.opened.wait(WAIT), "the gate was never opened"

    def wait(self):
        assert self.reached.wait(WAIT), "the gated request produced no token"

    def open(self):
        self.opened.set()


def collect(handle, cancel_after=None):
    """Iterates `handle` on a helper thread (so that a stuck iteration fails rather than hangs),
    cancelling it once `cancel_after` tokens came; returns the events it yielded."""
    events, failure = [], []

    def run():
        try:
            for event in handle:
                events.append(event)
                if cancel_after is not None and len(events) == cancel_after:
                    handle.cancel()
        except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "iterating the handle did not end"
    if failure:
        raise failure[0]
    return events


def done_order(handles):
    """A list that fills with each handle's name as its `done` future completes."""
    order = []
    for name, handle in handles.items():
        handle.done.add_done_callback(lambda _future, name=name: order.append(name))
    return order


def test_submitted_together_equal_generate_alone(folder, reference):
    with open_llm(folder) as llm:
        gate = Gate()
        first = llm.submit(PROMPTS[0], GREEDY, listener=gate)
        gate.wait()
        rest = [llm.engine_loop.submit(prompt, GREEDY) for prompt in PROMPTS[1:]]
        gate.open()
        outputs = [h.result(timeout=WAIT) for h in [first, *rest]]
        streamed = [collect(h) for h in rest]
        batch_sizes = list(llm.engine_loop.batch_sizes)
    assert max(batch_sizes) == 3  # they did share steps
    for prompt, out in zip(PROMPTS, outputs):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == reference(prompt, GREEDY)
        assert out.finish_reason == "length"
    # the handle streams exactly the result's tokens, the finish reason on the last one only
    for out, events in zip(outputs[1:], streamed):
        assert events == [(t, None) for t in out.token_ids[:-1]] + [(out.token_ids[-1], "length")]
    assert gate.events[:-1] == [(t, None) for t in outputs[0].token_ids[:-1]] + [(outputs[0].token_ids[-1], "length")]
    assert gate.events[-1] is None  # the listener hears the request leave


def test_short_request_overtakes_a_long_one(folder, reference):
    long_params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    short_params = SamplingParams(max_new_tokens=2)
    with open_llm(folder) as llm:
        gate = Gate()
        long = llm.submit(PROMPTS[1], long_params, listener=gate)
        gate.wait()  # the long one is generating
        short = llm.engine_loop.submit(PROMPTS[0], short_params)
        order = done_order({"long": long, "short": short})
        gate.open()
        short_out = short.result(timeout=WAIT)
        tokens_of_long_then = sum(1 for event in gate.events if event is not None)
        long_out = long.result(timeout=WAIT)
    assert order == ["short", "long"]
    assert tokens_of_long_then < 60  # the long one was still running when the short one left
    assert short_out.token_ids == reference(PROMPTS[0], short_params)
    assert long_out.token_ids == reference(PROMPTS[1], long_params)
    assert long_out.finish_reason == "length"


def test_cancelling_a_running_request_leaves_its_neighbour_alone(folder, reference):
    long_params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    beside_params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    with open_llm(folder) as llm:
        beside = llm.submit(PROMPTS[0], beside_params)
        long = llm.submit(PROMPTS[1], long_params)
        events = collect(long, cancel_after=2)  # ends once it leaves
        out = long.result(timeout=WAIT)
        beside_out = beside.result(timeout=WAIT)
        assert not llm.scheduler.running
    assert out.finish_reason == "cancelled"
    assert 2 <= len(out.token_ids) < 60
    assert out.token_ids == reference(PROMPTS[1], long_params)[: len(out.token_ids)]
    assert [token for token, _ in events] == out.token_ids
    assert beside_out.finish_reason == "length"
    assert beside_out.token_ids == reference(PROMPTS[0], beside_params)


def test_cancelling_a_waiting_request_answers_it_without_tokens(folder, reference):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with open_llm(folder) as llm:
        loop = llm.start_engine_loop(max_running=1)
        gate = Gate()
        running = llm.submit(PROMPTS[0], params, listener=gate)
        gate.wait()
        waiting = loop.submit(PROMPTS[1], params)  # max_running=1: it waits for `running`
        waiting.cancel()
        out = waiting.result(timeout=WAIT)  # answered at once, while the gate still holds the loop
        gate.open()
        running_out = running.result(timeout=WAIT)
        assert collect(waiting) == []
        batch_sizes = list(loop.batch_sizes)
    assert out.finish_reason == "cancelled"
    assert out.token_ids == [] and out.prompt_token_ids == PROMPTS[1]
    assert waiting.sequence is None  # never started
    assert batch_sizes == [1] * params.max_new_tokens  # only `running` ever ran
    assert running_out.token_ids == reference(PROMPTS[0], params)
    waiting.cancel()  # cancelling a finished request changes nothing
    assert waiting.result(timeout=WAIT) == out


def test_a_listener_that_raises_stops_only_its_own_request(folder, reference):
    """The listener runs on the stepping thread: its failure cancels its request, not the step."""
    long = SamplingParams(max_new_tokens=20, ignore_eos=True)

    def broken(event):
        if event is not None:
            raise ValueError("a bug in the listener")

    with open_llm(folder) as llm:
        ok = llm.submit(PROMPTS[0], long)
        bad = llm.submit(PROMPTS[2], long, listener=broken)
        assert bad.result(timeout=WAIT).finish_reason == "cancelled"
        assert ok.result(timeout=WAIT).token_ids == reference(PROMPTS[0], long)


def test_seeded_sampling_does_not_depend_on_its_neighbours(folder):
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    unseeded = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    with open_llm(folder) as llm:
        alone = llm.submit(PROMPTS[1], seeded).result(timeout=WAIT).token_ids
        assert llm.submit(PROMPTS[1], seeded).result(timeout=WAIT).token_ids == alone  # reproducible
        gate = Gate()
        neighbour = llm.submit(PROMPTS[0], unseeded, listener=gate)
        gate.wait()
        mine = llm.engine_loop.submit(PROMPTS[1], seeded)
        other = llm.engine_loop.submit(PROMPTS[2], unseeded)
        gate.open()
        beside = mine.result(timeout=WAIT).token_ids
        for handle in (neighbour, other):
            handle.result(timeout=WAIT)
        assert max(llm.engine_loop.batch_sizes) == 3  # the seeded one ran beside both
    assert beside == alone
    # and the seed matters: another seed gives other tokens
    with open_llm(folder) as llm:
        reseeded = SamplingParams(**{**vars(seeded), "seed": 6})
        assert llm.submit(PROMPTS[1], reseeded).result(timeout=WAIT).token_ids != alone


def test_max_running_caps_the_batch(folder, reference):
    prompts = [*PROMPTS, [40, 41, 42, 43, 44]]
    with open_llm(folder) as llm:
        loop = llm.start_engine_loop(max_running=2)
        gate = Gate()
        first = llm.submit(prompts[0], GREEDY, listener=gate)
        gate.wait()
        rest = [loop.submit(prompt, GREEDY) for prompt in prompts[1:]]  # all waiting at the next step
        gate.open()
        outputs = [h.result(timeout=WAIT) for h in [first, *rest]]
        batch_sizes = list(loop.batch_sizes)
    assert batch_sizes and all(size <= 2 for size in batch_sizes)
    assert max(batch_sizes) == 2
    assert sum(batch_sizes) == len(prompts) * GREEDY.max_new_tokens  # a step per token of each
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == reference(prompt, GREEDY)


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_decoder(folder, reference):
    short_params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    long_params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    long_prompt = [(7 * i + 3) % 101 for i in range(20)]
    order = []  # (name, token) in the order the stepping thread reported them
    with open_llm(folder, max_batch_tokens=4) as llm:
        gate = Gate()

        def short_listener(event):
            order.append(("short", event))
            gate(event)

        short = llm.submit(PROMPTS[0], short_params, listener=short_listener)
        gate.wait()  # the short one decodes from here on
        long = llm.engine_loop.submit(long_prompt, long_params, listener=lambda e: order.append(("long", e)))
        gate.open()
        short_out, long_out = short.result(timeout=WAIT), long.result(timeout=WAIT)
    first_long = next(i for i, (name, event) in enumerate(order) if name == "long")
    decoded_meanwhile = [event for name, event in order[1:first_long] if name == "short"]
    # no step carries more than 4 tokens, so the 20-token prompt took at least 5 steps, and the
    # short one decoded through each of them rather than waiting for the whole prompt
    assert len(decoded_meanwhile) >= 5
    assert short_out.token_ids == reference(PROMPTS[0], short_params)
    assert long_out.token_ids == reference(long_prompt, long_params)


def test_bad_requests_fail_on_the_callers_thread(folder, reference):
    llm = open_llm(folder)
    try:
        with pytest.raises(RequestError, match="at least one token"):
            llm.submit([])
        with pytest.raises(RequestError, match=r"\[0, 101\)"):
            llm.submit([3, llm.spec.vocab_size])
        with pytest.raises(RequestError, match="exceeds the model's 512 positions"):
            llm.submit([3] * 500, SamplingParams(max_new_tokens=20))
        with pytest.raises(RequestError, match="already running"):
            llm.start_engine_loop()  # the first submit started one
        # the loop is unharmed and serves the next request
        out = llm.submit(PROMPTS[0], GREEDY).result(timeout=WAIT)
        assert out.token_ids == reference(PROMPTS[0], GREEDY)
    finally:
        llm.close()
    with pytest.raises(LLMClosedError, match="closed by close"):
        llm.submit(PROMPTS[0], GREEDY)
    assert llm.engine_loop._thread.is_alive() is False
    never_started = open_llm(folder)
    never_started.close()
    with pytest.raises(LLMClosedError):
        never_started.submit(PROMPTS[0], GREEDY)
    assert never_started.engine_loop is None  # a closed LLM starts no loop


def test_submit_from_a_listener_does_not_wait_for_the_step(folder, reference):
    """A listener runs while its thread steps; LLM.submit from it queues and returns at once."""
    chained = []

    def chain(event):
        if event is not None and not chained:
            chained.append(llm.submit(PROMPTS[2], SamplingParams(max_new_tokens=2)))

    with open_llm(folder) as llm:
        first = llm.submit(PROMPTS[0], GREEDY, listener=chain)
        assert first.result(timeout=WAIT).token_ids == reference(PROMPTS[0], GREEDY)
        assert chained[0].result(timeout=WAIT).token_ids == reference(PROMPTS[2], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("max_running", [0, -1, 1.5, True])
def test_bad_max_running_is_refused(folder, max_running):
    with open_llm(folder) as llm:
        with pytest.raises(RequestError, match="max_running"):
            llm.start_engine_loop(max_running=max_running)
        assert llm.engine_loop is None


@pytest.mark.parametrize("num_layers, num_experts, top_k", [(2, 4, 2), (24, 64, 6), (32, 8, 2), (4, 16, 1)])
def test_fitting_batch_grows_with_the_slots(num_layers, num_experts, top_k):
    total = num_layers * num_experts
    sizes = [fitting_batch(num_layers, num_experts, top_k, slots) for slots in range(total + 1)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all(1 <= size <= 8 for size in sizes)
    # one token's experts fill the slots when they can hold no more: a batch of one
    assert sizes[0] == 1 and sizes[num_layers * top_k] == 1
    assert fitting_batch(num_layers, num_experts, top_k, total) == 8  # every expert resident: the cap
    assert fitting_batch(num_layers, num_experts, top_k, total, cap=3) == 3
