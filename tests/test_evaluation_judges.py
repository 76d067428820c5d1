"""Judges, offline: the HTTP judge against a chat-completions server started here, the prompt parsers, the
judgment cache, a local tiny model as judge, and the question readers."""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qlora_cli.core.errors import UserError
from qlora_cli.evaluation.judgments import Comparison, ScorePair
from qlora_cli.evaluation.http_judge import HttpJudge, served_models
from qlora_cli.evaluation.judge_cache import JudgmentCache
from qlora_cli.evaluation.judge_prompts import build_prompt
from qlora_cli.evaluation.judges import JudgeError, JudgeReply, judge_pairs
from qlora_cli.evaluation.local_judge import LocalJudge
from qlora_cli.evaluation.verdicts import parse_pairwise, parse_relative
from qlora_cli.evaluation.questions import Question, read_questions

KEY_ENV = "QLORA_TEST_JUDGE_KEY"


def completion(content: str, prompt_tokens: int = 11, completion_tokens: int = 3) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


class ChatServer:
    """A chat-completions server on 127.0.0.1: answers from `script` in order, then `default`; records
    every request and the most requests it ever had in flight at once."""

    def __init__(self):
        self.script: list[tuple[int, object, dict]] = []
        self.default: tuple[int, object, dict] | None = None  # None: echo the prompt with a [[A]] verdict
        self.requests: list[dict] = []
        self.delay, self.active, self.max_active = 0.0, 0, 0
        self.lock = threading.Lock()

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None  # None: a GET
        with self.lock:
            self.requests.append({"path": handler.path, "method": handler.command, "headers": dict(handler.headers),
                                  "body": body})
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            status, payload, headers = self.script.pop(0) if self.script else self.default or (
                (200, completion(body["messages"][0]["content"] + "\n[[A]]"), {}) if body is not None
                else (200, {"object": "list", "data": [{"id": "judge-model", "object": "model"}]}, {}))
        time.sleep(self.delay)
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        handler.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        with self.lock:
            self.active -= 1


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must be reached directly
    chat = ChatServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            chat.respond(self)

        def do_GET(self):
            chat.respond(self)

        def log_message(self, *args):  # keep the test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    chat.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield chat
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def key(monkeypatch) -> str:
    value = "sk-test-" + secrets.token_urlsafe(24)
    monkeypatch.setenv(KEY_ENV, value)
    return value


def http_judge(server: ChatServer, **options) -> HttpJudge:
    options = {"max_retries": 3, "backoff": 0.001, "timeout": 5, **options}
    return HttpJudge(server.base_url, "judge-model", KEY_ENV, **options)


# --- the HTTP judge ------------------------------------------------------------------------------


def test_http_judge_sends_a_chat_completion_and_reads_the_reply(server, key):
    server.script = [(200, completion("Both are fine, but B is clearer.\n[[B]]", 42, 9), {})]
    reply = http_judge(server).complete("Which is better?")
    assert reply.text == "Both are fine, but B is clearer.\n[[B]]"
    assert (reply.prompt_tokens, reply.completion_tokens) == (42, 9)
    assert reply.seconds >= 0 and parse_pairwise(reply.text) == "model_b"
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {"model": "judge-model", "messages": [{"role": "user", "content": "Which is better?"}],
                               "temperature": 0}
    assert request["headers"]["Authorization"] == f"Bearer {key}"


def test_http_judge_reads_the_key_when_it_calls(server, monkeypatch, key):
    judge = http_judge(server)
    monkeypatch.setenv(KEY_ENV, "sk-rotated")
    judge.complete("x")
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-rotated"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=KEY_ENV):
        judge.complete("x")
    assert len(server.requests) == 1


def test_http_judge_retries_server_errors_then_succeeds(server, key):
    server.script = [(500, "oops", {}), (503, {"error": {"message": "overloaded"}}, {}), (200, completion("[[C]]"), {})]
    reply = http_judge(server, max_retries=4).complete("q")
    assert parse_pairwise(reply.text) == "tie"
    assert len(server.requests) == 3


def test_http_judge_gives_up_after_max_retries(server, key):
    server.default = (502, {"error": {"message": "bad gateway"}}, {})
    with pytest.raises(JudgeError) as raised:
        http_judge(server, max_retries=2).complete("q")
    assert len(server.requests) == 3
    assert raised.value.attempts == 3 and raised.value.status == 502
    message = str(raised.value)
    assert server.base_url + "/chat/completions" in message and "502" in message and "3 attempts" in message


def test_http_judge_fails_at_once_on_401_and_other_client_errors(server, key):
    server.script = [(401, {"error": {"message": f"Incorrect API key provided: {key}"}}, {})]
    with pytest.raises(JudgeError) as raised:
        http_judge(server).complete("q")
    assert len(server.requests) == 1 and raised.value.status == 401 and raised.value.attempts == 1
    assert key not in str(raised.value) and "Incorrect" not in str(raised.value)
    server.script = [(400, {"error": {"message": "model not found"}}, {})]
    with pytest.raises(JudgeError, match="400: model not found"):
        http_judge(server).complete("q")
    assert len(server.requests) == 2


def test_http_judge_follows_no_redirect(server, key):
    server.script = [(307, "", {"Location": "http://example.invalid/steal"})]
    with pytest.raises(JudgeError) as raised:
        http_judge(server).complete("q")
    assert raised.value.status == 307 and len(server.requests) == 1


def test_http_judge_respects_retry_after_up_to_a_cap(server, key):
    server.script = [(429, "slow down", {"Retry-After": "3600"}), (200, completion("[[A]]"), {})]
    start = time.monotonic()
    reply = http_judge(server, max_wait=0.05, backoff=5).complete("q")
    assert parse_pairwise(reply.text) == "model_a" and len(server.requests) == 2
    assert time.monotonic() - start < 3  # capped at max_wait, neither an hour nor the 5 s backoff


def test_http_judge_retries_refused_connections_and_malformed_replies_fail(server, key):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = HttpJudge(f"http://127.0.0.1:{port}", "m", KEY_ENV, max_retries=2, backoff=0.001, timeout=2)
    with pytest.raises(JudgeError, match="gave up after 3 attempts; last: connection failed"):
        judge.complete("q")
    server.script = [(200, {"no": "choices"}, {})]
    with pytest.raises(JudgeError, match="not a chat completion"):
        http_judge(server).complete("q")
    assert len(server.requests) == 1


def test_the_api_key_leaks_nowhere(server, key, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    echo = {"error": {"message": f"overloaded; your key {key} is fine"}}
    judge = http_judge(server, max_retries=1)
    server.script, server.default = [(503, echo, {})], (200, completion("[[A]]"), {})
    cache = JudgmentCache(tmp_path / "cache.jsonl")
    question = Question("1", "general", ("Say hi.",))
    judgments, _, _ = judge_pairs(judge, [question], {"m1": {"1": "hi"}, "m2": {"1": "hello"}}, [("m1", "m2")],
                                  mode="pairwise", cache=cache)
    assert len(judgments) == 2 and "retrying" in caplog.text  # the retry was logged, without the key
    errors = []
    for status in (503, 401):
        server.script = [(status, echo, {})] * 2
        with pytest.raises(JudgeError) as raised:
            judge.complete("q")
        errors.append(raised.value)
    assert "[redacted]" in str(errors[0])
    places = [repr(judge), str(vars(judge)), caplog.text, (tmp_path / "cache.jsonl").read_text(),
              *capsys.readouterr()] + [text for error in errors for text in (str(error), repr(error), str(vars(error)))]
    assert all(key not in place for place in places)
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {key}"


def test_http_judge_keeps_at_most_concurrency_requests_in_flight(server, key):
    server.delay = 0.05
    replies = http_judge(server, concurrency=2).complete_many([f"prompt {n}" for n in range(8)])
    assert server.max_active == 2 and len(server.requests) == 8
    assert [reply.text.split("\n")[0] for reply in replies] == [f"prompt {n}" for n in range(8)]  # in order


def test_an_interrupt_cancels_queued_calls_and_keeps_the_finished_replies(server, key, tmp_path):
    import _thread

    server.delay = 0.3
    judge = http_judge(server, concurrency=2)
    questions = [Question(f"q{n}", "general", (f"question {n}?",)) for n in range(20)]
    answers = {m: {q.question_id: f"{m} on {q.question_id}" for q in questions} for m in ("m1", "m2")}
    path = tmp_path / "cache.jsonl"
    timer = threading.Timer(0.5, _thread.interrupt_main)  # what Ctrl-C does to the main thread
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        judge_pairs(judge, questions, answers, [("m1", "m2")], mode="pairwise", cache=JudgmentCache(path))
    timer.join()
    asked = len(server.requests)
    # The calls in flight were waited for and cached; the queued ones were never sent.
    assert 1 <= asked < 40 and server.active == 0
    assert len(path.read_bytes().splitlines()) == asked
    server.delay = 0.0
    _, _, calls = judge_pairs(judge, questions, answers, [("m1", "m2")], mode="pairwise", cache=JudgmentCache(path))
    assert len(server.requests) == 40 and sum(call["cached"] for call in calls) == asked


def test_complete_many_returns_failures_in_place(server, key):
    server.script = [(400, "bad", {})]
    replies = http_judge(server, concurrency=1).complete_many(["a", "b"])
    assert isinstance(replies[0], JudgeError) and isinstance(replies[1], JudgeReply)


def test_served_models_sends_the_key_and_reports_errors_as_the_judge_does(server, key, monkeypatch):
    assert served_models(server.base_url, KEY_ENV) == ["judge-model"]
    listing = server.requests[-1]
    assert (listing["method"], listing["path"]) == ("GET", "/v1/models")
    assert listing["headers"]["Authorization"] == f"Bearer {key}"
    # A refused key: the body (which may echo the key) is never shown.
    server.script.append((401, {"error": {"message": f"Incorrect API key provided: {key}"}}, {}))
    with pytest.raises(JudgeError) as refused:
        served_models(server.base_url, KEY_ENV)
    assert refused.value.status == 401 and "HTTP 401" in str(refused.value) and key not in str(refused.value)
    # Other errors say what the server said, with the key blanked out.
    server.script.append((404, {"error": {"message": f"no /models here for {key}"}}, {}))
    with pytest.raises(JudgeError) as missing:
        served_models(server.base_url, KEY_ENV)
    assert "HTTP 404 when listing the served models: no /models here for [redacted]" in str(missing.value)
    # A named variable that is not set is an error, as for a judge call, not a request without a key.
    asked = len(server.requests)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"{KEY_ENV} with the API key is not set"):
        served_models(server.base_url, KEY_ENV)
    assert len(server.requests) == asked
    assert served_models(server.base_url, None) == ["judge-model"]  # no variable named: no key sent
    assert "Authorization" not in server.requests[-1]["headers"]


# --- prompts and parsers -------------------------------------------------------------------------


@pytest.mark.parametrize("text, verdict", [
    ("A is more detailed.\n[[A]]", "model_a"),
    ("[[B]]", "model_b"),
    ("They are equally good. [[C]]", "tie"),
    ("First [[A]], on reflection still [[A]]", "model_a"),
    ("[[A]] or maybe [[B]]", None),
    ("Assistant A is better.", None),
    ("[A]", None),
    ("[[D]]", None),
    ("", None),
])
def test_parse_pairwise(text, verdict):
    assert parse_pairwise(text) == verdict


@pytest.mark.parametrize("text, scores", [
    ("Score A: 8 Score B: 6\nA is more complete.", (8.0, 6.0)),
    ("\n  score a: 7.5, Score B: 9  \nexplanation", (7.5, 9.0)),
    ("Score A: 1 Score B: 10", (1.0, 10.0)),
    ("8 6\nVicuna's form is not the one asked for", None),
    ("Score A: 11 Score B: 5", None),
    ("Score A: 0 Score B: 5", None),
    ("Score A: 8", None),
    ("Here are my scores: Score A: 8 Score B: 6", None),
    ("Explanation first.\nScore A: 8 Score B: 6", None),
    ("Score A: -3 Score B: 6", None),
    ("", None),
])
def test_parse_relative(text, scores):
    assert parse_relative(text) == scores


def test_prompts_show_the_question_and_both_answers_in_order():
    single = build_prompt("pairwise", Question("1", "g", ("What is 2+2?",)), "four", "4")
    assert single.index("What is 2+2?") < single.index("four") < single.index("Assistant B's Answer]\n4")
    assert "[[A]]" in single and "[[C]]" in single
    relative = build_prompt("relative", Question("1", "g", ("Q?",)), "x", "y")
    assert "Score A: <score> Score B: <score>" in relative
    multi = Question("2", "writing", ("Write a haiku.", "Now make it sadder."))
    conversation = build_prompt("pairwise", multi, ["h1", "h2"], ["k1", "k2"])
    order = ["Write a haiku.", "h1", "Now make it sadder.", "h2", "[The Start of Assistant B", "k1", "k2"]
    assert [conversation.index(part) for part in order] == sorted(conversation.index(part) for part in order)
    whole = build_prompt("pairwise", multi, "both answers", "other")
    assert "turn 1]\nWrite a haiku." in whole and "turn 2]\nNow make it sadder." in whole
    for bad in (["a", "b", "c"], "x"):  # not one per turn; one shape for A, another for B
        with pytest.raises(ValueError, match="one per turn"):
            build_prompt("pairwise", multi, bad, ["a", "b"])


# --- judge_pairs and the cache ------------------------------------------------------------------


class CountingJudge:
    """A judge that always answers `reply` (or the result of calling it with the prompt) and counts calls."""

    def __init__(self, reply="[[A]]", name="fake"):
        self.reply, self.name, self.calls = reply, name, 0

    def complete(self, prompt: str) -> JudgeReply:
        self.calls += 1
        text = self.reply(prompt) if callable(self.reply) else self.reply
        return JudgeReply(text, 10, 2, 0.01)


QUESTIONS = [Question(f"q{n}", "math" if n % 2 else "coding", (f"question {n}?",)) for n in range(1, 4)]
ANSWERS = {model: {q.question_id: f"{model} on {q.question_id}" for q in QUESTIONS} for model in ("m1", "m2", "m3")}


def test_every_pair_is_judged_in_both_orders_and_a_second_run_costs_nothing(tmp_path):
    judge, path = CountingJudge(), tmp_path / "cache.jsonl"
    pairs = [("m1", "m2"), ("m1", "m3")]
    cache = JudgmentCache(path)
    judgments, failures, calls = judge_pairs(judge, QUESTIONS, ANSWERS, pairs, mode="pairwise", cache=cache)
    assert judge.calls == 12 and failures == 0 and len(calls) == 12
    assert {(c.question_id, c.model_a, c.model_b) for c in judgments} == {
        (q.question_id, a, b) for q in QUESTIONS for x, y in pairs for a, b in ((x, y), (y, x))}
    assert judgments[:2] == [Comparison("q1", "m1", "m2", "model_a", "math", "fake"),
                             Comparison("q1", "m2", "m1", "model_a", "math", "fake")]
    assert not any(call["cached"] for call in calls) and calls[0]["prompt_tokens"] == 10
    again = CountingJudge()
    second, failures, calls = judge_pairs(again, QUESTIONS, ANSWERS, pairs, mode="pairwise", cache=JudgmentCache(path))
    assert again.calls == 0 and second == judgments and all(call["cached"] for call in calls)
    other = CountingJudge(name="another judge")  # the judge is part of the key
    judge_pairs(other, QUESTIONS, ANSWERS, pairs, mode="pairwise", cache=JudgmentCache(path))
    assert other.calls == 12


def test_identical_games_are_asked_once():
    same = {"m1": {"q1": "same"}, "m2": {"q1": "same"}}
    judge = CountingJudge()
    judgments, _, calls = judge_pairs(judge, QUESTIONS[:1], same, [("m1", "m2")], mode="pairwise")
    assert judge.calls == 1 and len(judgments) == 2 and [c["cached"] for c in calls] == [False, True]


def test_relative_scores_and_unparsable_replies_are_counted_not_scored(tmp_path):
    judge = CountingJudge(lambda prompt: "I refuse." if "question 2?" in prompt else "Score A: 7 Score B: 5\nok")
    scores, failures, calls = judge_pairs(judge, QUESTIONS, ANSWERS, [("m1", "m2")], mode="relative")
    assert failures == 2 and len(scores) == 4 and len(calls) == 6
    assert ScorePair("q1", "m2", "m1", 7.0, 5.0, "math", "fake") in scores
    assert all(s.question_id != "q2" for s in scores)


def test_a_truncated_last_cache_line_is_ignored_and_cut_off(tmp_path):
    path = tmp_path / "cache.jsonl"
    judge_pairs(CountingJudge(), QUESTIONS, ANSWERS, [("m1", "m2")], mode="pairwise", cache=JudgmentCache(path))
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # a crash in the middle of writing the last record
    assert len(JudgmentCache(path)._records) == 5
    judge = CountingJudge()
    judge_pairs(judge, QUESTIONS, ANSWERS, [("m1", "m2")], mode="pairwise", cache=JudgmentCache(path))
    assert judge.calls == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["key"] for line in lines)


def test_a_whole_last_cache_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "text": "[[A]]"}\n{"key": "b", "text": "[[B]]"}')
    cache = JudgmentCache(path)
    assert cache.get("b") == {"key": "b", "text": "[[B]]"}
    cache.put("c", {"text": "[[C]]"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_a_damaged_cache_line_that_is_not_the_last_is_reported(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "text": "[[A]]"}\nnot json\n{"key": "b", "text": "[[B]]"}\n')
    with pytest.raises(UserError) as raised:
        JudgmentCache(path)
    assert [(p.line, p.file) for p in raised.value.problems] == [(2, str(path))]


def test_failed_calls_raise_after_the_others_are_cached(tmp_path):
    def flaky(prompt):
        if "question 3?" in prompt:
            raise JudgeError("down", attempts=5)
        return "[[B]]"

    class Flaky(CountingJudge):
        def complete(self, prompt):
            self.calls += 1
            return JudgeReply(flaky(prompt), None, None, 0.0)

    path = tmp_path / "cache.jsonl"
    with pytest.raises(JudgeError, match="2 of 6 judge calls failed"):
        judge_pairs(Flaky(), QUESTIONS, ANSWERS, [("m1", "m2")], mode="pairwise", cache=JudgmentCache(path))
    judge = CountingJudge()
    judgments, _, _ = judge_pairs(judge, QUESTIONS, ANSWERS, [("m1", "m2")], mode="pairwise", cache=JudgmentCache(path))
    assert judge.calls == 2 and len(judgments) == 6


def test_missing_answers_are_a_user_error():
    answers = {"m1": ANSWERS["m1"], "m2": {"q1": "only one"}}
    with pytest.raises(UserError, match="model `m2` has no answer to question\\(s\\) q2, q3"):
        judge_pairs(CountingJudge(), QUESTIONS, answers, [("m1", "m2")], mode="pairwise")
    with pytest.raises(UserError, match="model `m9`"):
        judge_pairs(CountingJudge(), QUESTIONS, ANSWERS, [("m1", "m9")], mode="relative")


# --- a local model as judge ---------------------------------------------------------------------


@pytest.mark.parametrize("constrained", [True, False])
def test_local_judge_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, constrained):
    from qlora_cli.inference.generate import load_for_generation

    judge = LocalJudge(load_for_generation(str(tiny_model_dir)), max_new_tokens=6, constrained=constrained)
    assert judge.name == str(tiny_model_dir) + (" (constrained verdicts)" if constrained else "")
    questions = [Question("1", "general", ("What is the capital of France?",)),
                 Question("2", "writing", ("Write a haiku.", "Make it sadder."))]
    answers = {"a": {"1": "Paris.", "2": ["Waves fold into foam.", "Grey salt wind."]},
               "b": {"1": "Tokyo.", "2": ["The gull cries.", "Rain."]}}
    path = tmp_path / "cache.jsonl"
    judgments, failures, calls = judge_pairs(judge, questions, answers, [("a", "b")], mode="pairwise",
                                             cache=JudgmentCache(path))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(calls) == len(records) == 4 and all(call["prompt_tokens"] > 50 for call in calls)
    unreadable = sum(parse_pairwise(record["text"]) is None for record in records)
    assert failures == unreadable and len(judgments) == 4 - unreadable
    if constrained:  # the verdict is the likeliest of the three verdict tokens: always readable
        assert unreadable == 0 and all(record["text"] in ("[[A]]", "[[B]]", "[[C]]") for record in records)
    assert judge.complete("Hello").text == judge.complete("Hello").text  # greedy


# --- questions ----------------------------------------------------------------------------------


def write(path, lines: list) -> object:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_read_questions_in_every_format(tmp_path):
    vicuna = write(tmp_path / "vicuna.jsonl", [{"question_id": 1, "text": "Tell me a joke.", "category": "generic"}])
    assert read_questions(vicuna) == [Question("1", "generic", ("Tell me a joke.",))]
    mt = write(tmp_path / "mt.jsonl", [{"question_id": 81, "category": "writing", "turns": ["Write.", "Shorter."]}])
    assert read_questions(mt) == [Question("81", "writing", ("Write.", "Shorter."))]
    oa = write(tmp_path / "oa.jsonl", ["", {"text": "### Human: What is rain?### Assistant:"},
                                       {"text": "###Human:  Hi there  "}])
    assert read_questions(oa) == [Question("2", "general", ("What is rain?",)), Question("3", "general", ("Hi there",))]
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "One?"}, {"prompt": "Two?", "question_id": "b", "category": "x"}])
    assert read_questions(prompts) == [Question("1", "general", ("One?",)), Question("b", "x", ("Two?",))]
    table = tmp_path / "q.csv"
    table.write_text("question_id,category,prompt\n,math,What is 2+2?\nz,,Hi\n")
    assert read_questions(table) == [Question("2", "math", ("What is 2+2?",)), Question("z", "general", ("Hi",))]
    text = tmp_path / "prompts.txt"
    text.write_text("First prompt\n\n  Second prompt  \n")
    assert read_questions(text) == [Question("1", "general", ("First prompt",)),
                                    Question("3", "general", ("Second prompt",))]


def test_the_default_questions():
    questions = read_questions(None)
    assert [q.question_id for q in questions] == [f"q{n}" for n in range(1, 81)]
    categories = {q.category for q in questions}
    assert categories == {"generic", "knowledge", "roleplay", "common-sense", "fermi", "counterfactual",
                          "coding", "math", "writing"}
    assert all(8 <= sum(q.category == c for q in questions) <= 9 for c in categories)
    assert all(len(q.turns) == 1 and len(q.turns[0]) > 20 for q in questions)
    assert len({q.turns[0] for q in questions}) == 80


def test_every_bad_question_row_is_reported_with_its_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", [
        {"question_id": 1, "text": "fine"},
        "{not json",
        {"question_id": 3, "category": "x"},
        {"question_id": 4, "turns": []},
        {"question_id": 1, "text": "again"},
        {"text": "### Human: hi ### Assistant: hello ### Human: more ### Assistant:"},
        {"text": "a", "prompt": "b"},
        {"text": "ok", "category": 7},
        {"question_id": True, "text": "x"},
        [1, 2],
    ])
    with pytest.raises(UserError) as raised:
        read_questions(path)
    found = [(p.line, p.message) for p in raised.value.problems]
    assert [line for line, _ in found] == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    expected = ["not valid JSON", "expected a `text`, `turns` or `prompt`", "`turns` must be a non-empty array",
                "duplicate question id `1` (first at line 1)", "conversations with replies", "`text` and `prompt`",
                "`category` must be a string, got number", "`question_id` must be an integer or a string",
                "expected a JSON object, got array"]
    assert all(part in message for part, (_, message) in zip(expected, found)), found
    assert all(p.file == str(path) for p in raised.value.problems)


def test_unreadable_question_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no questions"):
        read_questions(empty)
    with pytest.raises(UserError, match="no such file"):
        read_questions(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="unsupported file type `.md`"):
        (tmp_path / "q.md").write_text("hi\n")
        read_questions(tmp_path / "q.md")
    text = tmp_path / "bad.txt"
    text.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(UserError) as raised:
        read_questions(text)
    assert [(p.line, p.message) for p in raised.value.problems] == [(2, "not valid UTF-8")]
