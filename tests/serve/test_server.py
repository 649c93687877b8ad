"""moeinf serve with the official openai client: completions and chat, whole and streamed, equal
LLM.generate; bad requests get OpenAI-shaped 400s naming the field; an error leaves the connection
usable; a disconnect cancels; a short request overtakes a long one; the command binds its port
first and drains on SIGTERM."""

import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from moeinf import LLM, SamplingParams
from moeinf.loaders.default_model import TOKENIZER_CONFIG, build_byte_tokenizer
from moeinf.serve.chat_template import ChatTemplate
from moeinf.serve.server import PortInUseError, Server, bind_port
from moeinf.serve.streamed_text import StreamedText
from tests.checkpoints import save_tiny_mixtral

PROMPTS = [[5, 9, 13, 2, 7], list(range(3, 20)), [17]]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo there"}]


def tiny_folder(folder, chat_template: bool):
    """A tiny Mixtral (4 layers x 8 experts, top-2) with the default model's byte-level tokenizer."""
    save_tiny_mixtral(
        folder, seed=12, vocab_size=259, bos_token_id=1, eos_token_id=2, num_hidden_layers=4, num_local_experts=8
    )
    build_byte_tokenizer().save(str(folder / "tokenizer.json"))
    config = dict(TOKENIZER_CONFIG)
    if not chat_template:
        del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("serve"), chat_template=True)


@pytest.fixture(scope="module")
def llm(folder):
    with LLM(folder, progress=False) as llm:
        yield llm


class Running:
    """A Server on a thread of its own, on a free loopback port."""

    def __init__(self, llm, **kwargs):
        self.server = Server(llm, bind_port("127.0.0.1", 0), ["tiny", "alias"], log_requests=False, **kwargs)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.url = self.server.url
        self.host, self.port = self.server.sock.getsockname()[:2]
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self):
        self.server.stop()
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(llm):
    running = Running(llm, max_running=4)
    yield running
    running.stop()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def raw(server, method: str, path: str, body=None, connection=None):
    """(status, JSON reply) over http.client, on `connection` if given (kept open)."""
    own = connection is None
    connection = connection or http.client.HTTPConnection(server.host, server.port, timeout=60)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    if own:
        connection.close()
    return response.status, reply


def test_a_completion_equals_generate(server, llm):
    reply = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    (expected,) = llm.generate([PROMPTS[0]], greedy(8))
    (choice,) = reply.choices
    assert choice.text == expected.text and choice.model_extra["token_ids"] == expected.token_ids
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[expected.finish_reason]
    assert reply.model == "tiny" and reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(PROMPTS[0]) and reply.usage.completion_tokens == len(expected.token_ids)


def test_several_prompts_and_text_in_one_request_and_the_alias(server, llm):
    prompts = ["héllo", "the experts"]
    reply = server.client.completions.create(model="alias", prompt=prompts, max_tokens=5, temperature=0)
    expected = llm.generate(prompts, greedy(5))
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [o.text for o in expected]
    assert reply.model == "tiny"  # answers carry the first name


def test_a_streamed_completion_sends_each_token_as_it_comes(server, llm):
    prompts = ["héllo", "experts"]
    stream = server.client.completions.create(
        model="tiny", prompt=prompts, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    expected = llm.generate(prompts, greedy(6))
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == sum(len(o.token_ids) for o in expected)
    tokens = chunks[:-1]
    assert len(tokens) == sum(len(o.token_ids) for o in expected)  # one chunk a token
    for i, out in enumerate(expected):
        mine = [c.choices[0] for c in tokens if c.choices[0].index == i]
        assert [t for c in mine for t in c.model_extra["token_ids"]] == out.token_ids
        assert "".join(c.text for c in mine) == out.text  # the pieces add up to the whole text
        assert [c.finish_reason for c in mine][:-1] == [None] * (len(mine) - 1) and mine[-1].finish_reason


def test_chat_renders_the_template_as_transformers_does(folder, llm):
    """The oracle: transformers' apply_chat_template over the same tokenizer files."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    template = ChatTemplate.from_checkpoint(folder)
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert template.render(CHAT) == expected
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert llm.codec.encode(expected, add_special_tokens=False) == list(ids)


def test_chat_completions_whole_and_streamed_equal_generate(server, llm, folder):
    ids = llm.codec.encode(ChatTemplate.from_checkpoint(folder).render(CHAT), add_special_tokens=False)
    (expected,) = llm.generate([ids], greedy(7))
    reply = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=7, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(ids)
    chunks = list(
        server.client.chat.completions.create(
            model="tiny", messages=CHAT, max_completion_tokens=7, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_without_a_template_is_a_clear_400(tmp_path):
    with LLM(tiny_folder(tmp_path, chat_template=False), progress=False) as plain:
        running = Running(plain)
        try:
            with pytest.raises(openai.BadRequestError, match="no chat template"):
                running.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        finally:
            running.stop()


@pytest.mark.parametrize(
    "change, param, message",
    [
        ({"seed": 100000000000000000000000}, "seed", "less than 9223372036854775808"),
        ({"prompt": [[True, False]]}, "prompt", "a string, a list of token ids"),
        ({"max_new_tokens": 3}, "max_new_tokens", "OpenAI's name: max_tokens"),
        ({"max_tokens": "8"}, "max_tokens", "valid integer"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"top_p": None}, "top_p", "valid number"),
        ({"n": 2}, "n", "Input should be 1"),
        ({"stream": "yes"}, "stream", "valid boolean"),
        ({"prompt": [5, 999]}, "prompt", r"prompt token ids must lie in [0, 259)"),
        ({"max_tokens": 10**6}, "prompt", "exceeds the model's"),
    ],
)
def test_bad_fields_get_400s_naming_the_openai_field(server, change, param, message):
    status, reply = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", **change})
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"]


def test_bodies_models_and_paths(server):
    assert raw(server, "POST", "/v1/completions", b"{not json")[0] == 400
    status, reply = raw(server, "POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt="hi")
    status, reply = raw(server, "GET", "/nowhere")
    assert status == 404 and set(reply["error"]) == {"message", "type", "param", "code"}
    assert raw(server, "GET", "/v1/completions")[0] == 405
    assert raw(server, "POST", "/v1/completions", b"x" * (2**20 + 1))[0] == 413


def test_an_error_answer_leaves_the_connection_usable(server, llm):
    """A POST to a wrong path, and one to chat with a bad body, answered on a keep-alive
    connection: the next valid request on it is answered (the bodies were read, not parsed as
    requests), through http.client and through the openai client."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    assert raw(server, "POST", "/v1/nowhere", {"model": "tiny", "prompt": "x" * 100}, connection)[0] == 404
    assert raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "prompt": "hi"}, connection)[0] == 400
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
    status, reply = raw(server, "POST", "/v1/completions", body, connection)
    connection.close()
    (expected,) = llm.generate([PROMPTS[0]], greedy(3))
    assert status == 200 and reply["choices"][0]["token_ids"] == expected.token_ids
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    again = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert again.choices[0].model_extra["token_ids"] == expected.token_ids


def test_service_endpoints(server):
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})
    assert [m.id for m in server.client.models.list()] == ["tiny", "alias"]
    status, stats = raw(server, "GET", "/stats")
    assert status == 200 and {"decode_tokens", "hits", "prefill_s"} <= set(stats)


def decode_tokens(llm) -> int:
    return llm.stats()["decode_tokens"]


def wait_idle(server, llm, timeout: float = 30) -> None:
    """Until the engine loop runs nothing."""
    deadline = time.monotonic() + timeout
    while llm.scheduler.running or server.server.engine._active:
        assert time.monotonic() < deadline, "the engine still runs requests"
        time.sleep(0.02)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_is_cancelled(server, llm, streamed):
    wait_idle(server, llm)
    before = decode_tokens(llm)
    sock = socket.create_connection((server.host, server.port), timeout=60)
    body = json.dumps(
        {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "stream": streamed}
    )
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    deadline = time.monotonic() + 30
    while decode_tokens(llm) - before < 3:  # it generates
        assert time.monotonic() < deadline
        time.sleep(0.01)
    if streamed:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    wait_idle(server, llm)
    assert decode_tokens(llm) - before < 390  # dropped long before its 400 tokens


def test_a_short_request_arriving_mid_generation_finishes_first(server, llm):
    wait_idle(server, llm)
    finished = []
    started = threading.Event()

    def long_one():
        stream = server.client.completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=120, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        for _ in stream:
            started.set()
        finished.append("long")

    thread = threading.Thread(target=long_one)
    thread.start()
    assert started.wait(60)
    short = server.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=2, temperature=0)
    finished.append("short")
    thread.join(120)
    assert finished == ["short", "long"]
    (expected,) = llm.generate([PROMPTS[2]], greedy(2))
    assert short.choices[0].model_extra["token_ids"] == expected.token_ids


def test_a_token_inside_a_multibyte_character_waits_for_the_rest(llm):
    """The byte-level tokenizer: a token per byte. 'é' is c3 a9, and c3 alone decodes to U+FFFD:
    its piece waits for the token that completes it. Without a tokenizer every piece is None."""
    x, c3, a9 = llm.encode("xé")[1:]  # after <s>
    text = StreamedText(llm.codec)
    assert [text.add(t, last=False) for t in (x, c3, a9)] + [text.add(c3, last=True)] == ["x", "", "é", "\ufffd"]
    assert text.sent == llm.codec.decode([x, c3, a9, c3])
    assert StreamedText(None).add(x, last=True) is None


def test_a_busy_port_is_a_named_error_before_the_model_loads(folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match="address already in use"):
            bind_port("127.0.0.1", port)
        command = [sys.executable, "-m", "moeinf.cli", "serve", "--model", str(folder), "--port", str(port)]
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "PortInUseError" in done.stderr and "already in use" in done.stderr
    assert "building" not in done.stderr and time.monotonic() - start < 60


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_serve_command_drains_on_a_signal_and_exits_0(folder, stop):
    """A streamed request running when the signal comes still gets all its tokens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "moeinf.cli", "serve", "--model", str(folder), "--port", "0", "--quiet"]
    # a shell's background job inherits SIGINT ignored; the server, like a terminal's, gets it as is
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=restore
    )
    try:
        line = process.stdout.readline()  # "moeinf serve: <name> on http://127.0.0.1:<port> (...)"
        assert " on http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.split(" on ")[1].split()[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(
            model=folder.name,
            prompt=PROMPTS[0],
            max_tokens=40,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        tokens = []
        for chunk in stream:
            if not tokens:
                process.send_signal(stop)
            tokens += chunk.choices[0].model_extra["token_ids"]
        assert len(tokens) == 40
    finally:
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    assert process.returncode == 0, err
    assert "stopping" in out
