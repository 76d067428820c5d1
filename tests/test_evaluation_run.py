"""`qlora eval` end to end on a tiny trained run with a local judge, and `qlora eval score` on files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import serving, train_tiny_run
from qlora_cli.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("eval")
    train_tiny_run(folder, tiny_model_dir, max_steps=2)
    return folder / "run"


def test_eval_end_to_end_with_a_local_judge_and_a_cache(run_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    args = ["eval", str(run_dir), "--judge", str(tiny_model_dir), "--limit", "4", "--max-new-tokens", "6",
            "--out", str(out)]
    main(args)
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["run", "run-base"] and report["reference"] == "run-base"
    # Constrained pairwise verdicts always parse: 4 questions x 2 orders.
    records = report["pairwise"]
    assert records["run"]["wins"] + records["run"]["ties"] + records["run"]["losses"] == 8
    assert set(report["elo"]) == {"run", "run-base"} and set(report["bradley_terry"]) == {"run", "run-base"}
    calls = report["judge_calls"]
    # Games whose prompts are identical (same answers both ways) are asked once.
    assert calls["total"] == 16 and calls["made"] + calls["cached"] == 16 and calls["made"] > 0
    assert "far too small" in report["notes"][0]
    assert (out / "report.md").is_file() and (out / "elo.png").is_file()
    assert len((out / "answers" / "run.jsonl").read_text().splitlines()) == 4
    judgments = (out / "judgments.jsonl").read_text().splitlines()
    assert len(judgments) == 8 + 8 - report["parse_failures"]
    # A second run reuses the answers and every judge reply: no model call at all.
    import qlora_cli.evaluation.answers as answers

    monkeypatch.setattr(answers, "generate_answers", lambda *a, **k: pytest.fail("answers were generated again"))
    main(args)
    again = json.loads((out / "report.json").read_text())
    assert again["judge_calls"]["made"] == 0 and again["judge_calls"]["cached"] == 16
    assert again["pairwise"] == report["pairwise"]
    # Re-scoring the judgments it wrote gives the same pairwise record.
    main(["eval", "score", str(out / "judgments.jsonl"), "--reference", "run-base", "--out", str(tmp_path / "rescored")])
    rescored = json.loads((tmp_path / "rescored" / "report.json").read_text())
    assert rescored["pairwise"] == report["pairwise"]


def test_eval_score_reads_fastchat_and_plain_files(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question_id": q, "model_a": a, "model_b": b, "winner": "model_a"}
        for q in range(10) for a, b in (("m1", "m2"), ("m2", "m1"))
    ] + [{"question_id": q, "model_a": "m1", "model_b": "m2", "score_a": 8, "score_b": 8} for q in range(10)]))
    fastchat = tmp_path / "fastchat.jsonl"
    fastchat.write_text(json.dumps({"question_id": 1, "model_1": "m1", "model_2": "m3", "g1_winner": "model_1",
                                    "g2_winner": "model_1", "judge": ["gpt-4", "pair-v2"], "turn": 1}) + "\n")
    main(["eval", "score", str(plain), str(fastchat), "--reference", "m2", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # The judge always prefers the answer it saw first: pooled over both orders, m1 and m2 tie.
    assert report["pairwise"]["m2"]["win_rate"] == pytest.approx(10 / 20)
    assert report["relative"]["models"]["m1"]["percent"] == pytest.approx(100.0)
    assert report["pairwise"]["m3"]["losses"] == 2


def test_plots_are_written_whole_and_a_plot_no_longer_made_is_removed(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    pairwise = tmp_path / "pairwise.jsonl"
    pairwise.write_text("".join(json.dumps({"question_id": q, "model_a": a, "model_b": b, "winner": "model_a",
                                            "category": "writing" if q % 2 else "coding"}) + "\n"
                                for q in range(6) for a, b in (("m1", "m2"), ("m2", "m1"))))
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"question_id": q, "model_a": "m1", "model_b": "m2", "score_a": 8,
                                          "score_b": 7}) + "\n" for q in range(6)))
    out = tmp_path / "out"
    main(["eval", "score", str(pairwise), "--out", str(out)])
    elo, categories = (out / "elo.png").read_bytes(), (out / "categories.png").read_bytes()
    assert elo.startswith(b"\x89PNG") and categories.startswith(b"\x89PNG")

    def torn_savefig(self, path, *args, **kwargs):  # a disk that fills up halfway through a plot
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", torn_savefig)
        with pytest.raises(OSError):
            main(["eval", "score", str(pairwise), "--out", str(out)])
    assert (out / "elo.png").read_bytes() == elo  # the previous plot, whole
    assert sorted(p.name for p in out.iterdir()) == ["categories.png", "elo.png", "report.json", "report.md"]

    # Score pairs alone make no pairwise ratings: a report written over the first has none of its plots.
    main(["eval", "score", str(scores), "--reference", "m2", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


def test_eval_score_malformed_lines_exit_2_with_strict(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "model_a": "a", "model_b": "b", "winner": "model_a"}\n{"question_id": 2}\nnot json\n')
    with pytest.raises(SystemExit) as exited:
        main(["eval", "score", str(bad), "--strict", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"{bad}:2" in err and f"{bad}:3" in err
    assert not (tmp_path / "out").exists()


def test_eval_baseline_base_needs_a_run_dir(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(tiny_model_dir), "--limit", "1", "--out", str(tmp_path / "out")])
    assert exited.value.code == 2 and "needs a run directory" in capsys.readouterr().err


def test_answers_made_elsewhere_join_the_comparison(run_dir, tiny_model_dir, tmp_path):
    from qlora_cli.evaluation.questions import read_questions

    questions = read_questions(None)[:2]
    supplied = tmp_path / "other.jsonl"
    supplied.write_text("".join(json.dumps({"question_id": q.question_id, "model_id": "other-bot",
                                            "choices": [{"index": 0, "turns": ["Arr!"]}]}) + "\n" for q in questions))
    out = tmp_path / "report"
    main(["eval", str(run_dir), "--judge", str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "4",
          "--mode", "pairwise", "--answers", str(supplied), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["run", "run-base", "other-bot"]
    assert report["pairwise"]["other-bot"]["wins"] + report["pairwise"]["other-bot"]["ties"] + report["pairwise"]["other-bot"]["losses"] == 4


# --- a served judge, and interrupted runs ------------------------------------------------------------


def no_proxies(monkeypatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must be reached directly


class SlowEngine:
    """`qlora serve`'s engine with a pause before each reply and a count of the replies it generated,
    so that a run can be interrupted while the judge is busy. The tiny model never writes a verdict, so
    `verdict` is appended to each reply, which a pairwise prompt's parser then reads."""

    def __init__(self, engine, pause: float = 0.0, verdict: str = "\n[[A]]"):
        self.engine, self.pause, self.replies, self.verdict = engine, pause, 0, verdict

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, *args, **kwargs):
        time.sleep(self.pause)  # on the server's event loop: it holds every request meanwhile
        self.replies += 1
        return VerdictAppended(self.engine.submit(*args, **kwargs), self.verdict)


class VerdictAppended:
    """A served reply whose text ends with `verdict`, written as the reply's last piece."""

    def __init__(self, reply, verdict: str):
        self.reply, self.verdict = reply, verdict

    def __getattr__(self, name):
        return getattr(self.reply, name)

    async def pieces(self):
        from qlora_cli.inference.serve import Generated

        async for piece in self.reply.pieces():
            if isinstance(piece, Generated):
                yield self.verdict
            yield piece


@pytest.fixture(scope="module")
def judge_engine(tiny_model_dir):
    from qlora_cli.inference.generate import load_for_generation
    from qlora_cli.inference.serve import Engine

    engine = Engine(load_for_generation(str(tiny_model_dir)), default_max_tokens=8)
    # Judge prompts outgrow the tiny model's nominal 512 positions; its rotary positions go further.
    engine.context = None
    return engine


def test_eval_with_a_served_judge(run_dir, judge_engine, tmp_path, monkeypatch, capsys):
    from qlora_cli.inference.serve import create_app

    no_proxies(monkeypatch)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a judge on this machine is called without a key
    engine = SlowEngine(judge_engine)
    out = tmp_path / "report"
    with serving(create_app(engine, "served-judge")) as url:
        # No --judge-model: the one model the endpoint lists.
        main(["eval", str(run_dir), "--judge", url, "--limit", "2", "--max-new-tokens", "4", "--mode", "both",
              "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == "served-judge"
    calls = report["judge_calls"]
    assert calls["total"] == 8 and calls["made"] == engine.replies > 0 and calls["made"] + calls["cached"] == 8
    assert calls["prompt_tokens"] > 0  # the server's usage counts came back
    # Every game is scored or counted as unparsable, none lost: the pairwise replies end with the verdict
    # the engine appends; the relative ones hold no scores, and the report says so.
    assert report["judgments"]["scored"] == 4 and report["parse_failures"] == 4
    assert [note.split(":")[0] for note in report["notes"]] == ["No relative judgment was scored"]
    assert "No API key sent" in capsys.readouterr().out


def write_answers(path, model: str, questions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": q.question_id, "model": model, "answer": f"{model} says {n}",
                                        "turns": [f"{model} says {n}"]}) + "\n" for n, q in enumerate(questions)))


@pytest.mark.slow
def test_ctrl_c_while_judging_exits_130_and_the_rerun_reuses_the_cache(tiny_model_dir, judge_engine, tmp_path,
                                                                         monkeypatch, capsys):
    import os
    import signal
    import subprocess
    import sys

    from qlora_cli.evaluation.questions import read_questions
    from qlora_cli.inference.serve import create_app

    no_proxies(monkeypatch)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    questions = read_questions(None)[:10]
    out, model = tmp_path / "eval", tiny_model_dir.name
    # Answers made before: the run only judges, and loads no model.
    write_answers(out / "answers" / f"{model}.jsonl", model, questions)
    write_answers(out / "answers" / "other-bot.jsonl", "other-bot", questions)
    args = ["eval", str(tiny_model_dir), "--baseline", "other-bot", "--limit", "10", "--mode", "pairwise",
            "--out", str(out)]
    cache = out / "judge_cache.jsonl"
    engine = SlowEngine(judge_engine, pause=0.5)
    with serving(create_app(engine, "judge")) as url:
        command = [sys.executable, "-m", "qlora_cli", *args, "--judge", url]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while process.poll() is None and not (cache.is_file() and len(cache.read_bytes().splitlines()) >= 2):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate()
        assert process.returncode == 130, err
        kept = len(cache.read_bytes().splitlines())
        assert "Interrupted. Kept 20 answer(s)" in err and f"{kept} judge replies" in err
        assert "Run the same command again to continue" in err and "Traceback" not in err
        assert 2 <= kept < 20 and engine.replies == kept  # queued calls were cancelled, finished ones kept

        engine.pause = 0.0
        capsys.readouterr()
        main([*args, "--judge", url])
    report = json.loads((out / "report.json").read_text())
    assert report["judge_calls"]["cached"] == kept and report["judge_calls"]["made"] == 20 - kept
    assert engine.replies == 20  # every game judged exactly once over both runs
    assert f"Judging (pairwise): {20 - kept}/{20 - kept} (100%)" in capsys.readouterr().out


def test_ctrl_c_while_answering_keeps_the_finished_batches(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import qlora_cli.inference.generate as generation
    from qlora_cli.evaluation.questions import read_questions

    questions = read_questions(None)[:12]
    out, model = tmp_path / "eval", tiny_model_dir.name
    write_answers(out / "answers" / "other-bot.jsonl", "other-bot", questions)
    asked = []

    def fake_generate(loaded, conversations, **sampling):
        if asked and interrupt:
            raise KeyboardInterrupt
        asked.append(len(conversations))
        return [f"reply {len(asked)}.{n}" for n in range(len(conversations))]

    monkeypatch.setattr(generation, "load_for_generation", lambda reference: "a loaded model")
    monkeypatch.setattr(generation, "generate", fake_generate)
    args = ["eval", str(tiny_model_dir), "--baseline", "other-bot", "--limit", "12", "--out", str(out), "--answers-only"]
    interrupt = True
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 130
    assert "Interrupted. Kept 20 answer(s)" in capsys.readouterr().err  # 8 made + 12 of other-bot
    assert len((out / "answers" / f"{model}.jsonl").read_text().splitlines()) == 8 and asked == [8]
    interrupt = False
    main(args)
    assert asked == [8, 4]  # only the 4 missing were asked again
    assert "Answers of " + model + ": generating 4 (8 reused)" in capsys.readouterr().out
    assert len((out / "answers" / f"{model}.jsonl").read_text().splitlines()) == 12


def test_answers_cut_short_by_a_kill_are_answered_again_and_the_torn_line_cut_off(tmp_path, monkeypatch):
    import qlora_cli.inference.generate as generation
    from qlora_cli.evaluation.answers import ensure_answers
    from qlora_cli.inference.sampling import Sampling
    from qlora_cli.evaluation.questions import read_questions

    questions = read_questions(None)[:6]
    asked = []

    def fake_generate(loaded, conversations, **sampling):
        asked.extend(conversation[-1]["content"] for conversation in conversations)
        return [f"reply {len(asked)}.{n}" for n in range(len(conversations))]

    monkeypatch.setattr(generation, "generate", fake_generate)
    path = tmp_path / "answers" / "bot.jsonl"
    write_answers(path, "bot", questions[:4])
    whole = path.read_bytes()
    path.write_bytes(whole[:-30])  # killed while writing the 4th answer: its line is cut short
    answers, _ = ensure_answers(path, "bot", questions, Sampling(), load=lambda: "a loaded model", say=lambda *a: None)
    assert asked == [q.turns[0] for q in questions[3:]]  # the torn answer and the two never made
    assert sorted(answers) == sorted(q.question_id for q in questions)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole, none torn
    assert [row["question_id"] for row in rows] == [q.question_id for q in questions]
    assert path.read_bytes().startswith(whole[:whole.rindex(b"\n", 0, len(whole) - 1) + 1])

    # A last answer without its newline (written by hand) is whole: kept, and a newline goes before the next.
    hand = tmp_path / "answers" / "hand.jsonl"
    write_answers(hand, "hand", questions[:2])
    hand.write_bytes(hand.read_bytes().rstrip(b"\n"))
    asked.clear()
    answers, _ = ensure_answers(hand, "hand", questions[:3], Sampling(), load=lambda: "a loaded model",
                                say=lambda *a: None)
    assert asked == [questions[2].turns[0]] and answers[questions[1].question_id] == ["hand says 1"]
    assert [json.loads(line)["question_id"] for line in hand.read_text().splitlines()] == [
        q.question_id for q in questions[:3]]


REMOTE_JUDGE = "https://judge.example.com/v1"  # never contacted: every request goes to a stub opener


@pytest.mark.parametrize("judge_model", [["--judge-model", "gpt-4"], []], ids=["judge-model", "listed-model"])
def test_a_remote_judge_without_its_key_is_refused_before_anything_runs(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys, judge_model):
    import urllib.error

    import qlora_cli.evaluation.http_judge as http_judge
    import qlora_cli.inference.generate as generation
    from qlora_cli.evaluation.questions import read_questions

    monkeypatch.delenv("QLORA_TEST_REMOTE_KEY", raising=False)
    opened, asked = [], []

    class Offline:
        def open(self, request, timeout=None):
            opened.append(request.full_url)
            raise urllib.error.URLError("offline")

    def fake_generate(loaded, conversations, **sampling):
        asked.append(len(conversations))
        return ["a reply"] * len(conversations)

    monkeypatch.setattr(http_judge, "_OPENER", Offline())
    monkeypatch.setattr(generation, "load_for_generation", lambda reference: "a loaded model")
    monkeypatch.setattr(generation, "generate", fake_generate)
    out, model = tmp_path / "eval", tiny_model_dir.name
    write_answers(out / "answers" / "other-bot.jsonl", "other-bot", read_questions(None)[:2])
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(tiny_model_dir), "--baseline", "other-bot", "--limit", "2", "--judge", REMOTE_JUDGE,
              *judge_model, "--api-key-env", "QLORA_TEST_REMOTE_KEY", "--out", str(out)])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "--api-key-env: the environment variable QLORA_TEST_REMOTE_KEY is not set" in err
    assert "Traceback" not in err
    # Refused before answering and before any request.
    assert asked == [] and opened == [] and not (out / "answers" / f"{model}.jsonl").exists()


def test_the_judge_key_variable_is_needed_only_off_this_machine(monkeypatch):
    from qlora_cli.core.errors import UserError
    from qlora_cli.evaluation.run import judge_key_env

    monkeypatch.delenv("QLORA_TEST_REMOTE_KEY", raising=False)
    said = []
    assert judge_key_env("http://127.0.0.1:8000/v1", "QLORA_TEST_REMOTE_KEY", say=said.append) is None
    assert judge_key_env("http://localhost:8000/v1", "QLORA_TEST_REMOTE_KEY", say=said.append) is None
    assert len(said) == 2 and "QLORA_TEST_REMOTE_KEY is not set" in said[0]
    with pytest.raises(UserError, match="QLORA_TEST_REMOTE_KEY is not set"):
        judge_key_env(REMOTE_JUDGE, "QLORA_TEST_REMOTE_KEY")
    monkeypatch.setenv("QLORA_TEST_REMOTE_KEY", "sk-test")
    assert judge_key_env(REMOTE_JUDGE, "QLORA_TEST_REMOTE_KEY") == "QLORA_TEST_REMOTE_KEY"
    assert judge_key_env("http://127.0.0.1:8000/v1", "QLORA_TEST_REMOTE_KEY") == "QLORA_TEST_REMOTE_KEY"


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_on_one():
    import io

    from rich.console import Console

    from qlora_cli.core.console import Steps, eta, plain_line

    assert plain_line("Judging (pairwise)", 20, 80, 60.0) == "Judging (pairwise): 20/80 (25%), 1:00 elapsed, about 3:00 left"
    assert plain_line("Answers of run", 80, 80, 240.0) == "Answers of run: 80/80 (100%), 4:00 elapsed"
    assert eta(0, 10, 5.0) is None and eta(5, 10, 5.0) == 5.0
    log = io.StringIO()
    with Steps(Console(file=log, force_terminal=False), "Answers of run", 3, plain_every=float("inf")) as bar:
        for _ in range(3):
            bar.advance()
    assert log.getvalue().splitlines() == ["Answers of run: 3/3 (100%), 0:00 elapsed"]  # one line, at the end
    screen = io.StringIO()
    with Steps(Console(file=screen, force_terminal=True, width=100), "Judging", 2) as bar:
        bar.advance(2)
    assert "Judging" in screen.getvalue() and "2/2" in screen.getvalue() and "eta" in screen.getvalue()


def test_ctrl_c_anywhere_in_a_command_exits_130_with_a_word(monkeypatch, capsys):
    import qlora_cli.evaluation.run as run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "score_files", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["eval", "score", "judgments.jsonl"])
    assert exited.value.code == 130 and "interrupted" in capsys.readouterr().err


class ScriptedJudge:
    """An HTTP judge's opener that answers every chat completion without a network: `reply(prompt)` gives
    the text of each reply; records the prompts."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def open(self, request, timeout=None):
        import io

        prompt = json.loads(request.data)["messages"][0]["content"]
        self.prompts.append(prompt)
        body = {"choices": [{"message": {"role": "assistant", "content": self.reply(prompt)}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 12}}
        return io.BytesIO(json.dumps(body).encode())


RAMBLING = ("Both assistants answer the question. Assistant A is more detailed, while Assistant B is shorter "
            "and easier to read; each has strengths, and which one is better depends on what the user wants.")


def judged_by(monkeypatch, tiny_model_dir, out, reply, *extra: str) -> ScriptedJudge:
    """`qlora eval run` of the tiny model against answers written beforehand (no model is loaded), with a
    judge on this machine that answers `reply(prompt)`; 3 questions, so 6 games per mode."""
    import qlora_cli.evaluation.http_judge as http_judge
    from qlora_cli.evaluation.questions import read_questions

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = ScriptedJudge(reply)
    monkeypatch.setattr(http_judge, "_OPENER", judge)
    questions = read_questions(None)[:3]
    write_answers(out / "answers" / f"{tiny_model_dir.name}.jsonl", tiny_model_dir.name, questions)
    write_answers(out / "answers" / "other-bot.jsonl", "other-bot", questions)
    main(["eval", str(tiny_model_dir), "--baseline", "other-bot", "--limit", "3", "--judge", "http://127.0.0.1:9/v1",
          "--judge-model", "judge", "--out", str(out), *extra])
    return judge


def test_an_evaluation_that_scores_nothing_says_why_and_exits_1(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exited:
        judged_by(monkeypatch, tiny_model_dir, out, lambda prompt: RAMBLING)
    captured = capsys.readouterr()
    assert exited.value.code == 1, captured.err
    err = " ".join(captured.err.split())  # the console wraps long lines
    assert "Nothing was scored: none of the judge's 12 replies held a first line `Score A: <1-10> Score B: " \
           "<1-10>` (relative) or a verdict [[A]], [[B]] or [[C]] (pairwise)" in err
    assert f'shown first: "{RAMBLING}"' in err  # one of the judge's replies, so the user sees why
    assert "judge_cache.jsonl" in err and "Traceback" not in err
    # The report is written whole and says the same.
    report = json.loads((out / "report.json").read_text())
    assert report["judgments"]["scored"] == 0 and report["judgments"]["unscored"] == 12
    assert report["unread_replies"]["pairwise"]["unread"] == 6
    assert report["unread_replies"]["relative"]["example"]["reply"] == RAMBLING
    markdown = (out / "report.md").read_text()
    assert "No pairwise judgment was scored: none of the judge's 6 pairwise replies held" in markdown
    assert "No relative judgment was scored" in markdown


def test_a_long_reply_is_shown_shortened_in_the_middle(tiny_model_dir, tmp_path, monkeypatch, capsys):
    long_reply = "I will compare them.\n\n" + "Assistant A explains the idea at length. " * 200 + "I cannot decide."
    with pytest.raises(SystemExit) as exited:
        judged_by(monkeypatch, tiny_model_dir, tmp_path / "eval", lambda prompt: long_reply, "--mode", "pairwise")
    err = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 1
    assert "none of the judge's 6 replies held a verdict [[A]], [[B]] or [[C]] (pairwise)" in err
    assert '"I will compare them. Assistant A explains' in err and '[...]' in err and 'I cannot decide."' in err
    assert len(err) < 1500  # not the 8,000-character reply


def test_a_mode_that_scores_nothing_is_noted_and_the_run_still_succeeds(tiny_model_dir, tmp_path, monkeypatch):
    # Verdicts for the pairwise prompt, none for the relative one: the pairwise figures stand.
    judge = judged_by(monkeypatch, tiny_model_dir, tmp_path / "eval",
                      lambda prompt: "[[A]]" if "[[A]]" in prompt else RAMBLING)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert len(judge.prompts) == 12 and report["judgments"]["scored"] == 6
    assert report["pairwise"][tiny_model_dir.name]["games"] == 6
    assert [note.split(":")[0] for note in report["notes"]] == ["No relative judgment was scored"]
