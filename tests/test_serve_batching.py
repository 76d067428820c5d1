"""Continuous batching (inference/engine.py) and several runs on one base (inference/served.py): replies under
load are the replies each request gets alone, rows may mix adapters, and the server survives a crowd."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from qlora_cli.inference.engine import BatchGenerator, Failed, Finished, GenerationRequest, join_rows, keep_rows

# The largest logit gap at which a batched greedy reply may part from the reply alone: the top two logits
# are then a near tie, which float rounding of batched sums (measured: |Δlogit| ~1e-6 here) may flip.
NEAR_TIE = 1e-3


class Collected:
    """What the generator delivers to one request, for a test to wait on."""

    def __init__(self):
        self.tokens, self.end, self.done = [], None, threading.Event()

    def __call__(self, item) -> None:
        if isinstance(item, list):
            self.tokens += item
        else:
            self.end = item
            self.done.set()


def alone(model, prompt: list[int], max_tokens: int, stop_ids) -> list[int]:
    """The greedy reply of `model` to `prompt` alone, by transformers' generate (what `qlora generate` runs)."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=list(stop_ids), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logit_gap_where_they_part(model, prompt: list[int], first: list[int], second: list[int]) -> float:
    """At the first position where two replies differ: how far the alone-computed logit of `second`'s token
    is below that of `first`'s."""
    at = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + first[:at]])).logits[0, -1]
    return float(logits[first[at]] - logits[second[at]])


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from qlora_cli.inference.generate import load_for_generation

    return load_for_generation(str(tiny_model_dir))


def test_greedy_replies_under_load_are_the_replies_alone_on_the_benchmark_questions(loaded):
    from qlora_cli.evaluation.questions import read_questions
    from qlora_cli.inference.generate import prompt_ids, stop_token_ids

    model, stops = loaded.model, frozenset(stop_token_ids(loaded))
    prompts = [prompt_ids(loaded.tokenizer, q.turns[0]) for q in read_questions(None)]
    budgets = [6 + index % 11 for index in range(len(prompts))]  # rows end at different steps: others join
    generator = BatchGenerator(model, max_batch=8, max_queue=len(prompts))
    replies = [Collected() for _ in prompts]
    try:
        for prompt, budget, reply in zip(prompts, budgets, replies):
            generator.submit(GenerationRequest(prompt, budget, stops, reply))
        assert all(reply.done.wait(300) for reply in replies)
    finally:
        generator.close()
    assert all(isinstance(reply.end, Finished) for reply in replies)
    parted = []
    for prompt, budget, reply in zip(prompts, budgets, replies):
        expected = alone(model, prompt, budget, stops)
        if reply.tokens != expected:
            parted.append(logit_gap_where_they_part(model, prompt, expected, reply.tokens))
    assert all(gap < NEAR_TIE for gap in parted), parted
    assert len(parted) <= len(prompts) // 10, f"{len(parted)} of {len(prompts)} replies parted"


def test_sampled_replies_follow_their_seed_alone_or_batched(loaded):
    from qlora_cli.inference.generate import prompt_ids

    prompt = prompt_ids(loaded.tokenizer, "Tell me a story.")
    generator = BatchGenerator(loaded.model, max_batch=4)

    def sample(seed: int, company: int = 0) -> list[int]:
        others = [Collected() for _ in range(company)]
        for other in others:
            generator.submit(GenerationRequest(prompt, 12, frozenset(), other, temperature=1.0))
        reply = Collected()
        generator.submit(GenerationRequest(prompt, 12, frozenset(), reply, temperature=1.0, top_p=0.9, seed=seed))
        assert reply.done.wait(120) and all(other.done.wait(120) for other in others)
        return reply.tokens

    try:
        first = sample(7)
        assert sample(7, company=3) == first and sample(8) != first
    finally:
        generator.close()


def test_joining_pads_the_shorter_side_on_the_left_and_leaving_trims_shared_padding():
    old = [(torch.ones(2, 1, 3, 2), torch.ones(2, 1, 3, 2))]
    new = [(torch.full((1, 1, 5, 2), 2.0), torch.full((1, 1, 5, 2), 2.0))]
    layers, mask = join_rows(old, torch.ones(2, 3, dtype=torch.long), new, torch.ones(1, 5, dtype=torch.long))
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert layers[0][0].shape == (3, 1, 5, 2) and layers[0][0][0, 0, :2].abs().sum() == 0
    assert torch.equal(layers[0][1][2], new[0][1][0])
    layers, mask = keep_rows(layers, mask, [0, 1])  # the long row leaves: its padding columns go
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]] and layers[0][0].shape == (2, 1, 3, 2)


def test_a_failing_forward_fails_its_requests_and_the_generator_goes_on(loaded, monkeypatch):
    generator = BatchGenerator(loaded.model, max_batch=2)
    forward = generator._forward
    broken = threading.Event()
    broken.set()

    def sometimes(*args, **kwargs):
        if broken.is_set():
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(generator, "_forward", sometimes)
    try:
        failed = Collected()
        generator.submit(GenerationRequest([1, 40, 41], 4, frozenset(), failed))
        assert failed.done.wait(60) and isinstance(failed.end, Failed) and "simulated" in str(failed.end.error)
        broken.clear()
        works = Collected()
        generator.submit(GenerationRequest([1, 40, 41], 4, frozenset(), works))
        assert works.done.wait(60) and works.end == Finished(4, False) and len(works.tokens) == 4
    finally:
        generator.close()


def held_forwards(generator, monkeypatch):
    """Make `generator`'s forwards wait for the returned event (the first forward says it started via the
    second); each forward's input shape is kept in the returned list."""
    release, started, shapes = threading.Event(), threading.Event(), []
    forward = generator._forward

    def held(input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        started.set()
        release.wait(60)
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(generator, "_forward", held)
    return release, started, shapes


def test_requests_waiting_together_are_prefilled_in_one_forward_and_answer_as_alone(loaded, monkeypatch):
    from qlora_cli.evaluation.questions import read_questions
    from qlora_cli.inference.generate import prompt_ids, stop_token_ids

    model, stops = loaded.model, frozenset(stop_token_ids(loaded))
    prompts = [prompt_ids(loaded.tokenizer, q.turns[0]) for q in read_questions(None)[:5]]
    assert len({len(prompt) for prompt in prompts}) > 1  # of different lengths: the shorter ones are padded
    generator = BatchGenerator(model, max_batch=8)
    release, started, shapes = held_forwards(generator, monkeypatch)
    replies = [Collected() for _ in prompts]
    try:
        generator.submit(GenerationRequest(prompts[0], 8, stops, replies[0]))
        assert started.wait(60)  # the first prompt is being read; the others wait together
        for prompt, reply in zip(prompts[1:], replies[1:]):
            generator.submit(GenerationRequest(prompt, 8, stops, reply))
        release.set()
        assert all(reply.done.wait(120) for reply in replies)
    finally:
        generator.close()
    assert (4, max(len(prompt) for prompt in prompts[1:])) in shapes  # the four waiting prompts read in one forward
    for prompt, reply in zip(prompts, replies):
        expected = alone(model, prompt, 8, stops)
        if reply.tokens != expected:
            assert logit_gap_where_they_part(model, prompt, expected, reply.tokens) < NEAR_TIE


def test_a_start_shared_with_an_earlier_prompt_is_not_read_again_and_replies_stay_as_alone(loaded, monkeypatch):
    from qlora_cli.evaluation.questions import read_questions
    from qlora_cli.inference.engine import shared_start
    from qlora_cli.inference.generate import prompt_ids, stop_token_ids

    model, stops = loaded.model, frozenset(stop_token_ids(loaded))
    system = "You are a careful assistant. Answer every question in one short, plain sentence."
    prompts = [prompt_ids(loaded.tokenizer, q.turns[0], system=system) for q in read_questions(None)[:6]]
    shared = min(shared_start(prompts[0], prompt) for prompt in prompts[1:])
    assert shared >= 8  # the system prompt and the template's start
    generator = BatchGenerator(model, max_batch=8)
    forward, reads = generator._forward, []

    def watched(input_ids, attention_mask, position_ids, layers, adapters):
        if input_ids.shape[1] > 1 or not layers:  # a prefill: how many tokens it read, and from how many cached
            reads.append((input_ids.shape[1], layers[0][0].shape[2] if layers else 0))
        return forward(input_ids, attention_mask, position_ids, layers, adapters)

    monkeypatch.setattr(generator, "_forward", watched)
    replies = [Collected() for _ in prompts]
    try:
        for prompt, reply in zip(prompts[:2], replies[:2]):  # one after the other
            generator.submit(GenerationRequest(prompt, 8, stops, reply))
            assert reply.done.wait(120)
        for prompt, reply in zip(prompts[2:], replies[2:]):  # together
            generator.submit(GenerationRequest(prompt, 8, stops, reply))
        assert all(reply.done.wait(120) for reply in replies)
    finally:
        generator.close()
    assert reads[0] == (len(prompts[0]), 0)  # the first prompt is read whole
    assert reads[1] == (len(prompts[1]) - shared_start(prompts[0], prompts[1]), shared_start(prompts[0], prompts[1]))
    assert all(cached >= shared for _, cached in reads[1:])  # later ones start from the kept keys and values
    for prompt, reply in zip(prompts, replies):
        expected = alone(model, prompt, 8, stops)
        if reply.tokens != expected:
            assert logit_gap_where_they_part(model, prompt, expected, reply.tokens) < NEAR_TIE


def test_max_queue_zero_takes_requests_while_a_row_is_free_and_refuses_the_rest(loaded, monkeypatch):
    from qlora_cli.inference.engine import QueueFull

    generator = BatchGenerator(loaded.model, max_batch=2, max_queue=0)
    release, started, _ = held_forwards(generator, monkeypatch)
    first, second = Collected(), Collected()
    try:
        generator.submit(GenerationRequest([1, 40, 41], 3, frozenset(), first))
        assert started.wait(60)  # taken off the queue and being prefilled: it still holds its row
        generator.submit(GenerationRequest([1, 42], 3, frozenset(), second))
        with pytest.raises(QueueFull) as refused:
            generator.submit(GenerationRequest([1, 43], 3, frozenset(), Collected()))
        assert refused.value.waiting == 0 and refused.value.retry_after >= 1
        release.set()
        assert first.done.wait(60) and second.done.wait(60)
        assert first.end == Finished(3, False) and second.end == Finished(3, False)
        again = Collected()  # the rows are free again
        generator.submit(GenerationRequest([1, 43], 2, frozenset(), again))
        assert again.done.wait(60) and again.end == Finished(2, False)
    finally:
        generator.close()
    with pytest.raises(ValueError):
        BatchGenerator(loaded.model, max_batch=2, max_queue=-1)


def test_dtype_serves_a_plain_model_as_asked_and_is_refused_for_a_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import qlora_cli.inference.serve as serving_module
    from qlora_cli.cli import main

    engine, _ = serving_module.load_served([str(tiny_model_dir)], "tiny", max_tokens=4, max_batch=2, max_queue=0,
                                           dtype="bfloat16")
    try:
        assert next(engine.batch.model.parameters()).dtype == torch.bfloat16
        reply = Collected()
        engine.batch.submit(GenerationRequest([1, 40, 41], 3, frozenset(), reply))
        assert reply.done.wait(60) and reply.end == Finished(3, False)
    finally:
        engine.batch.close()
    monkeypatch.setattr(serving_module, "load_served", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    run = fake_run(tmp_path / "a", tiny_model_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    for argv, reason in [([str(run), "--dtype", "bfloat16"], "--dtype is for a merged or plain model"),
                         ([str(tiny_model_dir), "--dtype", "int8"], "--dtype: 'int8' is not one of")]:
        with pytest.raises(SystemExit) as exited:
            main(["serve", *argv, "--port", port])
        error = capsys.readouterr().err
        assert exited.value.code == 2 and reason in error and "Traceback" not in error


# --- several runs on one base ---------------------------------------------------------------------------


def fake_run(folder, model_dir, **quantization):
    """A run folder as far as the pre-load checks read it: the resolved recipe and the adapter's config."""
    import json

    from conftest import tiny_recipe_text, write_jsonl

    folder.mkdir(parents=True)
    write_jsonl(folder / "data.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    text = tiny_recipe_text(model_dir, [str(folder / "data.jsonl")])
    for key, value in quantization.items():
        text = text.replace("quantization:\n", f"quantization:\n  {key}: {value}\n")
    (folder / "recipe.yaml").write_text(text)
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_dir)}))
    return folder


def test_runs_on_another_base_or_quantized_otherwise_are_refused_before_loading(tmp_path, tiny_model_dir,
                                                                                 chatml_model_dir, monkeypatch, capsys):
    import qlora_cli.inference.served as served
    from qlora_cli.cli import main

    monkeypatch.setattr(served, "load_runs", lambda runs: pytest.fail("a model was loaded"))
    first = fake_run(tmp_path / "a", tiny_model_dir)
    other_base = fake_run(tmp_path / "b", chatml_model_dir)
    other_quant = fake_run(tmp_path / "c", tiny_model_dir, quant_type="fp4")
    same_name = fake_run(tmp_path / "x" / "a", tiny_model_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    for run, reason in [(other_base, f"base model: '{chatml_model_dir}' here, '{tiny_model_dir}' in {first}"),
                        (other_quant, "quantization.quant_type: 'fp4' here, 'nf4'"),
                        (same_name, "both be served as `a`"),
                        (tmp_path / "missing", "is not a finished run folder")]:
        with pytest.raises(SystemExit) as exited:
            main(["serve", str(first), str(run), "--port", port])
        error = capsys.readouterr().err
        assert exited.value.code == 2 and reason in error and "Traceback" not in error
    assert served.check_servable_together([str(first), str(fake_run(tmp_path / "d", tiny_model_dir))])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Two quickstart-style runs of the tiny model, trained apart enough to answer differently."""
    from conftest import train_tiny_run

    runs = []
    for name, seed in (("pirate", 1), ("sailor", 2)):
        folder = tmp_path_factory.mktemp(name)
        train_tiny_run(folder, tiny_model_dir, max_steps=3, learning_rate=3e-2, seed=seed)
        runs.append((folder / "run").rename(folder / name))
    return runs


@pytest.mark.slow
def test_two_runs_served_together_answer_as_qlora_generate_does_in_mixed_concurrent_traffic(two_runs, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from conftest import serving
    from qlora_cli.core.models import load_run
    from qlora_cli.inference.generate import generate
    from qlora_cli.inference.serve import Engine, create_app
    from qlora_cli.inference.served import check_servable_together, load_runs

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    questions = [[{"role": "user", "content": text}] for text in
                 ("What is the capital of France?", "Add two and three.", "Write a haiku about the sea.", "Arr!")]
    expected = {}
    for run in two_runs:  # what `qlora generate RUN` answers, each run loaded on its own
        single = load_run(run)
        expected[run.name] = [generate(single, [messages], temperature=0, max_new_tokens=10)[0] for messages in questions]
    assert expected["pirate"] != expected["sailor"]  # otherwise a mix-up of adapters would not show

    loaded, served = load_runs(check_servable_together([str(run) for run in two_runs]))
    engine = Engine(loaded, 16, max_batch=8, served=served)
    rows = []
    forward = engine.batch._forward

    def watched(input_ids, attention_mask, position_ids, layers, adapters):
        rows.append(set(adapters))
        time.sleep(0.01)  # let requests pile up into mixed batches
        return forward(input_ids, attention_mask, position_ids, layers, adapters)

    monkeypatch.setattr(engine.batch, "_forward", watched)
    with serving(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert sorted(model.id for model in client.models.list().data) == ["pirate", "sailor"]

        def ask(index: int) -> tuple[str, int, str]:
            name, question = ("pirate", "sailor")[index % 2], (index // 2) % 4
            options = dict(model=name, messages=questions[question], temperature=0, max_tokens=10)
            if index % 3 == 0:
                chunks = client.chat.completions.create(stream=True, **options)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = client.chat.completions.create(**options).choices[0].message.content
            return name, question, text

        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(ask, range(24)))
    engine.batch.close()
    assert [text.strip() for _, _, text in answers] == [expected[name][question] for name, question, _ in answers]
    assert any(len(adapters) == 2 for adapters in rows)  # some steps ran both runs' rows in one batch


# --- a crowd ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_200_requests_from_32_clients_a_tenth_leaving_mid_stream_all_end_cleanly(loaded):
    import json
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from conftest import serving
    from qlora_cli.inference.serve import Engine, create_app

    engine = Engine(loaded, 16, max_batch=8, max_queue=64)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(url: str, body: dict):
        request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return opener.open(request, timeout=120)
    questions = ["What is the capital of France?", "Add two and three.", "Write a haiku about the sea.", "Arr!"]

    def ask(url: str, index: int) -> str:
        body = {"model": "tiny", "messages": [{"role": "user", "content": questions[index % 4]}], "temperature": 0,
                "max_tokens": 8 + index % 9, "stream": index % 2 == 0}
        try:
            with post(url, body) as response:
                if not body["stream"]:
                    assert json.loads(response.read())["choices"][0]["finish_reason"] in ("stop", "length")
                    return "answered"
                lines = [line.decode().strip() for line in response if line.startswith(b"data: ")]
                assert lines[-1] == "data: [DONE]" and '"finish_reason": "' in lines[-2], lines[-2:]
                return "answered"
        except urllib.error.HTTPError as error:
            assert error.code == 503 and int(error.headers["Retry-After"]) >= 1  # a clean refusal
            return "busy"

    def ask_or_leave(url: str, index: int) -> str:
        if index % 10 != 0:
            return ask(url, index)
        body = {"model": "tiny", "messages": [{"role": "user", "content": questions[index % 4]}], "max_tokens": 16,
                "stream": True}
        with post(url, body) as response:
            for line in response:
                if line.startswith(b'data: {"id"') and b'"content": "' in line and b'"content": ""' not in line:
                    return "left"  # closing the response here drops the connection mid-stream
        return "ended before it could leave"

    try:
        with serving(create_app(engine, "tiny")) as url:
            with ThreadPoolExecutor(max_workers=32) as pool:
                outcomes = list(pool.map(lambda index: ask_or_leave(url, index), range(200)))
            deadline = time.monotonic() + 60
            while (engine.batch.running or engine.batch.waiting) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.batch.running == 0 and engine.batch.waiting == 0  # every row was freed
            assert ask(url, 1) == "answered"  # and the server still answers
    finally:
        engine.batch.close()
    assert outcomes.count("left") == 20
    assert outcomes.count("answered") + outcomes.count("busy") == 180 and outcomes.count("answered") >= 150
