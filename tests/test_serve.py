"""`qlora serve`, with the official `openai` client as the real client: the tiny model served in-process
on a free port, streaming and not, sampling options, bad requests, a key, concurrent requests."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai  # the `test` extra
import pytest

from conftest import serving
from qlora_cli.inference.serve import ChatRequest, Engine, StopScanner, create_app

MODEL = "tiny"
KEY_ENV = "QLORA_TEST_SERVE_KEY"
HELLO = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from qlora_cli.inference.generate import load_for_generation

    return load_for_generation(str(tiny_model_dir))


@pytest.fixture(scope="module")
def engine(loaded):
    return Engine(loaded, default_max_tokens=16)


@pytest.fixture(scope="module")
def base_url(engine):
    with serving(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture
def client(base_url, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def greedy(client, messages=HELLO, **options) -> object:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **options)


def streamed(client, messages=HELLO, **options) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [MODEL]


def test_a_reply_is_what_the_model_generates_with_its_chat_template(client, loaded):
    from qlora_cli.inference.generate import conversation_ids, generate

    response = greedy(client, max_tokens=12)
    (choice,) = response.choices
    expected = generate(loaded, [HELLO], temperature=0, max_new_tokens=12)[0]
    assert choice.message.role == "assistant" and choice.message.content.strip() == expected
    assert response.model == MODEL and response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(conversation_ids(loaded.tokenizer, HELLO))
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert choice.finish_reason == ("length" if response.usage.completion_tokens == 12 else "stop")


def test_streaming_sends_the_same_reply_piece_by_piece(client):
    plain = greedy(client, max_tokens=12)
    text, chunks = streamed(client, temperature=0, max_tokens=12, stream_options={"include_usage": True})
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_max_tokens_bounds_the_reply(client):
    response = greedy(client, max_tokens=3)
    assert response.usage.completion_tokens <= 3
    if response.choices[0].finish_reason == "length":
        assert response.usage.completion_tokens == 3
    default = greedy(client)  # no max_tokens: the server's default (16 here)
    assert default.usage.completion_tokens <= 16


def test_a_stop_sequence_cuts_the_reply_streamed_or_not(client):
    full = greedy(client, max_tokens=24).choices[0].message.content
    start = next(k for k in range(4, len(full) - 3) if full.find(full[k:k + 3]) == k and full[k:k + 3].strip())
    stop = full[start:start + 3]
    cut = greedy(client, max_tokens=24, stop=[stop, "never-appears"])
    assert cut.choices[0].message.content == full[:start] and cut.choices[0].finish_reason == "stop"
    text, chunks = streamed(client, temperature=0, max_tokens=24, stop=stop)
    assert text == full[:start]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_a_seed_makes_sampling_repeatable(client):
    options = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 10, "seed": 7}
    first = client.chat.completions.create(model=MODEL, messages=HELLO, **options).choices[0].message.content
    again = client.chat.completions.create(model=MODEL, messages=HELLO, **options).choices[0].message.content
    assert first == again
    text, _ = streamed(client, **options)
    assert text == first


@pytest.mark.parametrize("options, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
])
def test_bad_requests_get_400_with_an_error_object(client, options, param):
    request = {"model": MODEL, "messages": HELLO, **options}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    error = raised.value.body
    assert raised.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def raw(url: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain request, no client library in between: POST when there is a body."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_malformed_bodies_unknown_models_and_routes(base_url):
    status, body = raw(f"{base_url}/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(f"{base_url}/chat/completions", {"model": "gpt-4", "messages": HELLO})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert raw(f"{base_url}/completions")[0] == 404
    status, body = raw(f"{base_url}/chat/completions")
    assert status == 405 and body["error"]["message"].startswith("method GET not allowed")
    # The server is still up and answering.
    assert raw(f"{base_url}/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2})[0] == 200


def test_a_key_from_the_environment_is_required_when_set(engine, monkeypatch):
    from qlora_cli.core.errors import UserError
    from qlora_cli.inference.serve import read_api_key

    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(UserError, match=KEY_ENV):
        read_api_key(KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "sk-serve-secret")
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with serving(create_app(engine, MODEL, read_api_key(KEY_ENV))) as url:
        with pytest.raises(openai.AuthenticationError) as raised:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert "sk-serve-secret" not in str(raised.value.body)
        good = openai.OpenAI(base_url=url, api_key="sk-serve-secret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_concurrent_requests_share_batches_and_get_the_replies_they_get_alone(client, engine, monkeypatch):
    prompts = [[{"role": "user", "content": text}] for text in
               ("What is the capital of France?", "Add two and three.", "Write a haiku about the sea.", "Arr!")]
    alone = [greedy(client, messages, max_tokens=10).choices[0].message.content for messages in prompts]
    rows = []
    forward = engine.batch._forward

    def watched(input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        time.sleep(0.02)  # widen the window in which other requests join the batch
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine.batch, "_forward", watched)

    def ask(index: int) -> str:
        if index % 2:
            return streamed(client, prompts[index % 4], temperature=0, max_tokens=10)[0]
        return greedy(client, prompts[index % 4], max_tokens=10).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == [alone[index % 4] for index in range(8)]
    assert max(rows) > 1  # decode steps ran several replies at once


class Gate:
    """Holds the batch generator's forwards until released; counts the requests that reached the queue and
    keeps the generation requests submitted and the ones prefilled."""

    def __init__(self, engine, monkeypatch):
        self.release, self.started, self.lock = threading.Event(), threading.Event(), threading.Lock()
        self.arrived, self.submitted, self.prefilled = 0, [], []
        prepare, submit, forward, prefill = engine.prepare, engine.batch.submit, engine.batch._forward, engine.batch._prefill

        def counted_prepare(*args):
            result = prepare(*args)
            with self.lock:
                self.arrived += 1
            return result

        def kept_submit(request):
            submit(request)
            self.submitted.append(request)

        def kept_prefill(requests):
            self.prefilled.extend(requests)
            return prefill(requests)

        def held_forward(*args, **kwargs):
            self.started.set()
            while not self.release.is_set():
                time.sleep(0.01)
            return forward(*args, **kwargs)

        monkeypatch.setattr(engine, "prepare", counted_prepare)
        monkeypatch.setattr(engine.batch, "submit", kept_submit)
        monkeypatch.setattr(engine.batch, "_forward", held_forward)
        monkeypatch.setattr(engine.batch, "_prefill", kept_prefill)

    def wait_for_arrivals(self, count: int) -> None:
        while self.arrived < count:
            time.sleep(0.01)


def raw_request(base_url: str, body: dict) -> socket.socket:
    """A chat-completions request sent on a socket the test can close before the reply comes."""
    host, port = base_url.removeprefix("http://").removesuffix("/v1").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


@pytest.fixture
def one_row_engine(loaded):
    """An engine that generates one reply at a time and lets one more wait: queues and refusals show."""
    engine = Engine(loaded, default_max_tokens=16, max_batch=1, max_queue=1)
    yield engine
    engine.batch.close()


def test_queued_requests_hold_no_worker_thread(engine, client, monkeypatch):
    """Waiting for the model must not take one of the server's worker threads: with a thread per waiting
    request, the server runs out of threads for anything else once enough queue up."""
    import urllib.request

    import anyio.to_thread

    prompts = [[{"role": "user", "content": text}] for text in ("Add two and three.", "Arr!")]
    alone = [greedy(client, messages, max_tokens=6).choices[0].message.content for messages in prompts]
    app = create_app(engine, MODEL)

    @app.get("/threads-in-use")
    async def threads_in_use():
        return {"borrowed": anyio.to_thread.current_default_thread_limiter().borrowed_tokens}

    gate = Gate(engine, monkeypatch)
    with serving(app) as url:
        local = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

        def ask(index: int) -> str:
            if index % 2:
                return streamed(local, prompts[index % 2], temperature=0, max_tokens=6)[0]
            return greedy(local, prompts[index % 2], max_tokens=6).choices[0].message.content

        with ThreadPoolExecutor(max_workers=6) as pool:
            replies = [pool.submit(ask, index) for index in range(6)]
            gate.wait_for_arrivals(6)
            root = url.removesuffix("/v1")
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            in_use = json.load(no_proxy.open(f"{root}/threads-in-use"))["borrowed"]
            health = no_proxy.open(f"{root}/health").status
            gate.release.set()
            answers = [reply.result() for reply in replies]
    assert in_use == 0  # six requests are waiting for the model, none of them in a thread
    assert health == 200  # answers while the model is busy
    assert answers == [alone[index % 2] for index in range(6)]


def test_a_client_that_leaves_frees_its_row_or_is_skipped_in_the_queue(one_row_engine, monkeypatch):
    engine = one_row_engine
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 8}
    gate = Gate(engine, monkeypatch)
    with serving(create_app(engine, MODEL)) as url:
        answering = raw_request(url, body)
        gate.started.wait()
        queued = raw_request(url, body)
        gate.wait_for_arrivals(2)
        queued.close()
        answering.close()
        first, second = gate.submitted
        assert first.cancelled.wait(60) and second.cancelled.wait(60)  # noticed within a poll (0.25 s)
        gate.release.set()
        local = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        after = greedy(local, max_tokens=4)
        # The first left mid-reply: its row was freed; the one that left while queued never got one.
        assert after.choices[0].message.content
        deadline = time.monotonic() + 30
        while engine.batch.running and time.monotonic() < deadline:  # the last reply's row leaves after its last token
            time.sleep(0.01)
        assert engine.batch.running == 0
    assert gate.prefilled == [first, gate.submitted[2]]


def test_a_full_queue_is_answered_503_with_retry_after_not_held(one_row_engine, monkeypatch):
    import urllib.error
    import urllib.request

    engine = one_row_engine
    gate = Gate(engine, monkeypatch)
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2}).encode()
    with serving(create_app(engine, MODEL)) as url:
        running = raw_request(url, json.loads(body))
        gate.started.wait()
        waiting = raw_request(url, json.loads(body))
        gate.wait_for_arrivals(2)
        request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        started = time.perf_counter()
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(request, timeout=30)
        seconds = time.perf_counter() - started
        gate.release.set()
        for sock in (running, waiting):
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
            sock.close()
    error = json.loads(refused.value.read())["error"]
    assert refused.value.code == 503 and error["code"] == "server_overloaded"
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert seconds < 5  # answered at once, not after the model became free


# --- the pure parts ---------------------------------------------------------------------------------


def test_stop_scanner_holds_back_what_could_start_a_stop_sequence():
    scanner = StopScanner(["###", "\nUser:"])
    assert scanner.feed("Hello #") == "Hello "  # "#" may start "###"
    assert scanner.feed("1 and ##") == "#1 and "
    assert scanner.feed("# tail") == "" and scanner.stopped
    assert scanner.finish() == ""
    plain = StopScanner([])
    assert plain.feed("a\nUser") + plain.finish() == "a\nUser"
    whole = StopScanner(["\nUser:"])
    assert whole.feed("Fine.\nUser: more") + whole.finish() == "Fine."
    streamed_pieces = StopScanner(["\nUser:"])
    assert "".join(streamed_pieces.feed(p) for p in ["Fine.", "\nUs", "er: more"]) + streamed_pieces.finish() == "Fine."


def test_request_defaults_are_openai_s():
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert (request.temperature, request.top_p, request.stop, request.stream) == (1.0, 1.0, None, False)
    assert ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], stop="END").stop == ["END"]


def test_help_imports_neither_torch_nor_the_server_stack():
    import subprocess
    import sys

    probe = (
        "import sys\nfrom qlora_cli.cli import main\n"
        "for argv in (['--help'], ['serve', '--help'], ['eval', 'score', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "loaded = [name for name in ('torch', 'fastapi', 'uvicorn', 'transformers') if name in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_taken_port_or_a_missing_key_fails_before_loading(tmp_path, monkeypatch, capsys):
    import socket

    import qlora_cli.inference.generate as generation
    from qlora_cli.cli import main

    monkeypatch.setattr(generation, "load_for_generation", lambda reference: pytest.fail("the model was loaded"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            main(["serve", "smollm2-135m-instruct", "--port", str(port)])
    assert exited.value.code == 2 and f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "smollm2-135m-instruct", "--api-key-env", KEY_ENV])
    assert exited.value.code == 2 and f"{KEY_ENV} is not set" in capsys.readouterr().err
