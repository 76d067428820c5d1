"""Judging answers with an LLM, as the QLoRA paper did with GPT-4: each pair of answers to a question is
judged in BOTH presentation orders, either as a verdict (A, B or tie) or as two 1-10 scores.

A judge is an OpenAI-compatible HTTP endpoint (`HttpJudge`) or a local transformers model (`LocalJudge`).
Replies are cached by what was judged (`JudgmentCache`), so re-running a benchmark costs nothing, and a
reply the parser cannot read is counted as a parse failure, never scored.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Protocol, Sequence

from ..core.errors import Problem, UserError
from ..core.jsonl_log import JsonlLog
from .judgments import Comparison, ScorePair, Winner
from .questions import Question

if TYPE_CHECKING:
    from ..core.models import LoadedModel

log = logging.getLogger(__name__)

Mode = Literal["pairwise", "relative"]
Answer = str | Sequence[str]  # one string, or one string per turn of a multi-turn question

_INTRO = (
    "[Instruction]\nAct as an impartial judge of two AI assistants. Below is a user's question (or a "
    "conversation of several user turns) and the answers of Assistant A and Assistant B. Judge how helpful, "
    "relevant, accurate, deep and detailed each answer is, and whether it does what the user asked; for a "
    "conversation, judge every turn. Do not let the order in which the answers appear, their length or the "
    "assistants' names sway you: judge the content only.\n\n{dialogue}\n[Your Task]\n"
)
# The output format comes last, after the answers, where judges follow it most reliably.
PAIRWISE = _INTRO + (
    "Compare the two answers and explain your reasoning briefly and objectively. Then give your verdict on "
    "the last line in exactly this form: [[A]] if Assistant A is better, [[B]] if Assistant B is better, "
    "or [[C]] if they are equally good. Write no other text in double brackets."
)
RELATIVE = _INTRO + (
    "Give each answer an overall score from 1 to 10, where a higher score means a better answer. Your "
    "FIRST line must hold only the two scores, in exactly this form:\nScore A: <score> Score B: <score>\n"
    "Then, from the second line on, explain your scores."
)
TEMPLATES = {"pairwise": PAIRWISE, "relative": RELATIVE}
SCORE_RANGE = (1.0, 10.0)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_VERDICTS: dict[str, Winner] = {"A": "model_a", "B": "model_b", "C": "tie"}
# Labelled scores rather than Vicuna's bare "8 7": a first line such as "1. Assistant A ..." can never be
# read as scores by mistake, and the labels say which score is whose.
_SCORES = re.compile(r"Score A:\s*(\d+(?:\.\d+)?)\s*[,;]?\s*Score B:\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_RETRYABLE = 429  # and every 5xx
_NO_DETAIL = (401, 403)  # servers echo (part of) the key in auth errors, so their bodies are never shown


def parse_pairwise(text: str) -> Winner | None:
    """The verdict of a pairwise reply, or None when it holds no [[A]]/[[B]]/[[C]] or several different ones."""
    found = set(_VERDICT.findall(text))
    return _VERDICTS[found.pop()] if len(found) == 1 else None


def parse_relative(text: str) -> tuple[float, float] | None:
    """(score A, score B) from the first non-blank line, which must be exactly `Score A: x Score B: y`;
    None when it is not, or when a score is outside 1..10."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    match = _SCORES.fullmatch(first)
    if match is None:
        return None
    scores = float(match[1]), float(match[2])
    return scores if all(SCORE_RANGE[0] <= s <= SCORE_RANGE[1] for s in scores) else None


def _as_turns(answer: Answer) -> tuple[str, ...]:
    return (answer,) if isinstance(answer, str) else tuple(answer)


def render_dialogue(question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """The question and both answers as the judge sees them. Answers with one string per turn are shown as
    two conversations; single strings are shown after all the turns.

    Raises:
        ValueError: the answers are not both one string or both one string per turn.
    """
    parts = []
    answers = {"A": _as_turns(answer_a), "B": _as_turns(answer_b)}
    if not (len(answers["A"]) == len(answers["B"]) and len(answers["A"]) in (1, len(question.turns))):
        raise ValueError(f"question {question.question_id}: the answers must both be one string or both one per turn")
    if len(answers["A"]) == 1:
        for number, turn in enumerate(question.turns, start=1):
            label = "User Question" if len(question.turns) == 1 else f"User Question, turn {number}"
            parts.append(f"[{label}]\n{turn}\n")
        for name, (text,) in answers.items():
            parts.append(f"[The Start of Assistant {name}'s Answer]\n{text}\n[The End of Assistant {name}'s Answer]\n")
        return "\n".join(parts)
    for name, replies in answers.items():
        lines = [f"[The Start of Assistant {name}'s Conversation with User]"]
        for turn, reply in zip(question.turns, replies):
            lines += ["", "### User:", turn, "", f"### Assistant {name}:", reply]
        parts.append("\n".join(lines + [f"[The End of Assistant {name}'s Conversation with User]\n"]))
    return "\n".join(parts)


def build_prompt(mode: Mode, question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """The full judge prompt: PAIRWISE or RELATIVE with the question and both answers filled in."""
    return TEMPLATES[mode].format(dialogue=render_dialogue(question, answer_a, answer_b))


def prompt_kind(mode: Mode) -> str:
    """`mode` plus a digest of its template, so that editing a prompt never reuses replies to the old one."""
    return f"{mode}:{hashlib.sha256(TEMPLATES[mode].encode()).hexdigest()[:12]}"


def cache_key(judge: str, kind: str, question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """sha256 of everything a reply depends on; JSON, so no choice of separator can make two inputs collide."""
    fields = [judge, kind, question.question_id, list(question.turns),
              list(_as_turns(answer_a)), list(_as_turns(answer_b))]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class JudgeReply:
    """A judge's reply; token counts are None when the judge does not report them, seconds is wall time."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float


class JudgeError(Exception):
    """A judge call that failed for good; the message names the URL, the status and the attempts, never a key."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.url, self.status, self.attempts = url, status, attempts


class Judge(Protocol):
    name: str

    def complete(self, prompt: str) -> JudgeReply: ...


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses redirects: urllib would send the Authorization header on to wherever they point."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _api_request(url: str, api_key_env: str | None, body: dict | None = None) -> urllib.request.Request:
    """A GET of `url`, or a POST of `body` as JSON, with the key from the environment variable `api_key_env`
    as a bearer token (none when `api_key_env` is None).

    Raises:
        JudgeError: `api_key_env` is named but not set.
    """
    # The key lives only in this frame and in the request's headers, which no message or repr shows.
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise JudgeError(f"{url}: the environment variable {api_key_env} with the API key is not set", url=url)
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")


def _error_detail(error: urllib.error.HTTPError, api_key_env: str | None) -> str:
    """": <a short excerpt of the error body>", with the key blanked out in case the server echoes it; ""
    for 401 and 403, whose bodies are never shown, and for an empty or unreadable body."""
    if error.code in _NO_DETAIL:
        return ""
    try:
        text = error.read(2000).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
    try:
        text = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    key = os.environ.get(api_key_env) if api_key_env else None
    text = text.replace(key, "[redacted]") if key else text
    return f": {' '.join(text.split())[:200]}" if text.strip() else ""


def _connection_problem(error: Exception) -> str:
    """What went wrong with a connection, as urllib or the socket says it."""
    return str(getattr(error, "reason", None) or error or type(error).__name__)


class HttpJudge:
    """An OpenAI-compatible chat-completions endpoint, asked at temperature 0.

    The API key is read from the environment variable `api_key_env` at every request and is kept nowhere
    else: not in this object, its repr, the cache, logs or error messages. With `api_key_env=None` no
    Authorization header is sent (local servers). Connection errors, 429 and 5xx are retried up to
    `max_retries` times, waiting `backoff * 2**n` seconds or the server's Retry-After, at most `max_wait`;
    other 4xx fail at once.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", *, max_retries: int = 4,
                 backoff: float = 1.0, timeout: float = 120, concurrency: int = 4, max_wait: float = 60.0,
                 name: str | None = None):
        if concurrency < 1 or max_retries < 0:
            raise ValueError("`concurrency` must be at least 1 and `max_retries` at least 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.name = model, api_key_env, name or model
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.concurrency, self.max_wait = concurrency, max_wait
        # Set when the caller is interrupted: calls still running make no further attempt and do not wait.
        self._stopping = threading.Event()

    def __repr__(self) -> str:
        return f"HttpJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _request(self, prompt: str) -> urllib.request.Request:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        return _api_request(self.url, self.api_key_env, body)

    def _reply(self, payload: bytes, seconds: float, attempt: int) -> JudgeReply:
        try:
            data = json.loads(payload)
            text = data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: the reply is not a chat completion (no choices[0].message.content)",
                             url=self.url, status=200, attempts=attempt) from None
        usage = data.get("usage") or {}
        return JudgeReply(str(text), usage.get("prompt_tokens"), usage.get("completion_tokens"), seconds)

    def complete(self, prompt: str) -> JudgeReply:
        """The judge's reply to `prompt`; `seconds` includes retries and waits.

        Raises:
            JudgeError: the key's variable is unset, a 4xx other than 429, a malformed reply, or still
                failing after `max_retries` retries.
        """
        start, attempts = time.monotonic(), self.max_retries + 1
        for attempt in range(1, attempts + 1):
            if self._stopping.is_set():
                raise JudgeError(f"{self.url}: stopped (interrupted) before attempt {attempt}", url=self.url,
                                 attempts=attempt - 1)
            status, wait = None, None
            try:
                with _OPENER.open(self._request(prompt), timeout=self.timeout) as response:
                    payload = response.read()
                return self._reply(payload, time.monotonic() - start, attempt)
            except urllib.error.HTTPError as error:
                status, reason = error.code, _error_detail(error, self.api_key_env)
                wait = _retry_after((error.headers or {}).get("Retry-After"))
                error.close()
                if status != _RETRYABLE and status < 500:
                    raise JudgeError(f"{self.url}: HTTP {status}{reason} (attempt {attempt}, not retried)",
                                     url=self.url, status=status, attempts=attempt) from None
                what = f"HTTP {status}{reason}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                what = f"connection failed: {_connection_problem(error)}"
            if attempt == attempts:
                break
            delay = min(self.max_wait, wait if wait is not None else self.backoff * 2 ** (attempt - 1))
            log.warning("judge %s: %s (attempt %d of %d); retrying in %.1f s", self.url, what, attempt, attempts, delay)
            self._stopping.wait(delay)
        raise JudgeError(f"{self.url}: gave up after {attempts} attempts; last: {what}",
                         url=self.url, status=status, attempts=attempts)

    def complete_many(self, prompts: list[str], on_reply: Callable[[int, JudgeReply | JudgeError], None] | None = None
                      ) -> list[JudgeReply | JudgeError]:
        """Replies in the order of `prompts`, at most `concurrency` requests in flight; a failed call is its
        JudgeError. `on_reply(index, result)` is called as each call ends, from a worker thread.

        On KeyboardInterrupt (or any other exception in the calling thread) the calls not yet started
        are cancelled and those in flight make no further attempt (no retry, no back-off wait); they are
        waited for, so that their replies reach `on_reply` (and a cache) before the exception is re-raised.
        """
        def one(index: int, prompt: str) -> JudgeReply | JudgeError:
            try:
                result = self.complete(prompt)
            except JudgeError as error:
                result = error
            if on_reply is not None and not (self._stopping.is_set() and isinstance(result, JudgeError)):
                on_reply(index, result)
            return result

        self._stopping.clear()
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        try:
            futures = [pool.submit(one, index, prompt) for index, prompt in enumerate(prompts)]
            return [future.result() for future in futures]
        except BaseException:
            self._stopping.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=False)


def served_models(base_url: str, api_key_env: str | None, timeout: float = 30) -> list[str]:
    """The model ids an OpenAI-compatible endpoint lists at GET {base_url}/models, asked with the key from
    `api_key_env` as `HttpJudge` sends it.

    Raises:
        JudgeError: `api_key_env` is named but not set, the endpoint cannot be reached or does not answer
            with a model list.
    """
    url = base_url.rstrip("/") + "/models"
    try:
        with _OPENER.open(_api_request(url, api_key_env), timeout=timeout) as response:
            data = json.loads(response.read())
        return [str(entry["id"]) for entry in data["data"]]
    except urllib.error.HTTPError as error:
        detail = _error_detail(error, api_key_env)
        error.close()
        raise JudgeError(f"{url}: HTTP {error.code} when listing the served models{detail}", url=url,
                         status=error.code) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise JudgeError(f"{url}: cannot list the served models: {_connection_problem(error)}", url=url) from None
    except (ValueError, KeyError, TypeError):
        raise JudgeError(f"{url}: the reply is not a model list (no data[].id)", url=url) from None


class LocalJudge:
    """A transformers model judging in-process, greedily, one prompt at a time: batching would pad prompts
    together, and a judgment must not depend on which other prompts it was batched with.

    With `constrained`, a pairwise verdict is the most likely of the three verdict tokens after the prompt
    and "[[" (as multiple-choice benchmarks score answers), so a small model that would not follow the
    output format still gives a verdict; relative judgments are generated freely either way.
    """

    def __init__(self, loaded: LoadedModel, max_new_tokens: int = 256, constrained: bool = True):
        self.loaded, self.max_new_tokens, self.constrained = loaded, max_new_tokens, constrained
        self.name = loaded.description + (" (constrained verdicts)" if constrained else "")

    def _verdict(self, prompt: str) -> str:
        import torch

        from ..inference.generate import prompt_ids

        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        ids = prompt_ids(tokenizer, prompt) + tokenizer("[[", add_special_tokens=False)["input_ids"]
        choices = {letter: tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in "ABC"}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0, -1]
        best = max(choices, key=lambda letter: logits[choices[letter]].item())
        return f"[[{best}]]"

    def complete(self, prompt: str) -> JudgeReply:
        """The model's greedy reply; completion_tokens counts the reply re-tokenized, so it is approximate."""
        from ..inference.generate import generate, prompt_ids  # here, not at the top: it imports torch

        start, tokenizer = time.monotonic(), self.loaded.tokenizer
        if self.constrained and prompt.endswith(PAIRWISE.split("{dialogue}", 1)[1]):
            text = self._verdict(prompt)
        else:
            text = generate(self.loaded, [prompt], max_new_tokens=self.max_new_tokens, temperature=0)[0]
        completion = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return JudgeReply(text, len(prompt_ids(tokenizer, prompt)), completion, time.monotonic() - start)


class JudgmentCache:
    """Judge replies in a JSON Lines file, one record per line, keyed by `cache_key`.

    Each record is appended with one write and fsync'd (a `JsonlLog`), so a crash can only cut the LAST
    line short; such a line is ignored on read and cut off before the next append. Any other bad line
    is a UserError.
    """

    def __init__(self, path: Path):
        self.path, self._records, self._log = Path(path), {}, JsonlLog(path)
        problems = []
        for number, line in enumerate(self._log.read().split(b"\n"), start=1):
            try:
                record = json.loads(line)
                if not isinstance(record["text"], str):
                    raise TypeError("`text` is not a string")
                self._records[str(record["key"])] = record
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    problems.append(Problem("not a cache record; delete the file to start afresh", file=str(self.path),
                                            line=number))
        if problems:
            raise UserError(problems, title=f"{self.path}: the judgment cache is damaged:")

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def put(self, key: str, record: dict) -> None:
        """Appends `record` (with its key) as one line; safe to call from several threads."""
        record = {**record, "key": key}
        self._log.append((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._records[key] = record


def _games(questions: list[Question], answers: dict[str, dict[str, Answer]],
           pairs: list[tuple[str, str]]) -> list[tuple[Question, str, str]]:
    """(question, model shown first, model shown second) for every question and pair, in both orders.

    Raises:
        UserError: a model of a pair has no answer to some question. ValueError: a pair names one model twice.
    """
    if any(first == second for first, second in pairs):
        raise ValueError("a pair compares a model with itself")
    problems = []
    for model in dict.fromkeys(model for pair in pairs for model in pair):
        missing = [q.question_id for q in questions if q.question_id not in answers.get(model, {})]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            problems.append(f"model `{model}` has no answer to question(s) {', '.join(missing[:10])}{more}")
    if problems:
        raise UserError(problems, title="cannot judge: answers are missing:")
    return [(q, one, two) for q in questions for first, second in pairs
            for one, two in ((first, second), (second, first))]


def _complete_all(judge: Judge, prompts: list[str], on_reply: Callable[[int, JudgeReply | JudgeError], None]) -> None:
    """Every prompt through `judge.complete_many` when the judge has one (concurrent), else one by one."""
    if hasattr(judge, "complete_many"):
        judge.complete_many(prompts, on_reply=on_reply)
        return
    for index, prompt in enumerate(prompts):
        try:
            reply = judge.complete(prompt)
        except JudgeError as error:
            reply = error
        on_reply(index, reply)


def _judgment(mode: Mode, text: str, question: Question, a: str, b: str, judge: str) -> Comparison | ScorePair | None:
    common = {"category": question.category, "judge": judge}
    if mode == "pairwise":
        verdict = parse_pairwise(text)
        return None if verdict is None else Comparison(question.question_id, a, b, verdict, **common)
    scores = parse_relative(text)
    return None if scores is None else ScorePair(question.question_id, a, b, *scores, **common)


def judge_pairs(judge: Judge, questions: list[Question], answers: dict[str, dict[str, Answer]],
                pairs: list[tuple[str, str]], *, mode: Mode, cache: JudgmentCache | None = None,
                progress: Callable[[int], object] | None = None,
                ) -> tuple[list[Comparison] | list[ScorePair], int, list[dict]]:
    """Judges every pair on every question in both orders (A/B, then B/A), asking only what `cache` lacks.

    Args:
        answers: {model: {question_id: answer}}; an answer is one string, or one string per turn.
        mode: "pairwise" gives `Comparison`s, "relative" gives `ScorePair`s.
        progress: `progress(calls to make)` gives a context manager with `advance(n)`, told of each reply.

    Returns:
        (judgments, parse_failures, calls): one judgment per reply the parser read, in game order; how
        many replies it could not read (never scored); and one dict per game, {question_id, model_a,
        model_b, judge, seconds, prompt_tokens, completion_tokens, cached}, `cached` True when this run
        made no call for it (its seconds and tokens are then those of the call that did).

    Raises:
        UserError: answers are missing. JudgeError: some calls failed; the others are cached first, so
            running again asks only for the failed ones.
    """
    if mode not in TEMPLATES:
        raise ValueError(f"`mode` must be one of {', '.join(TEMPLATES)}, got {mode!r}")
    games, kind = _games(questions, answers, pairs), prompt_kind(mode)
    shown = [(q, answers[a][q.question_id], answers[b][q.question_id]) for q, a, b in games]
    keys = [cache_key(judge.name, kind, *game) for game in shown]
    todo: dict[str, tuple[str, str]] = {}  # key -> (question id, prompt); asked once even if two games share it
    for key, game in zip(keys, shown):
        if key not in todo and (cache is None or cache.get(key) is None):
            todo[key] = (game[0].question_id, build_prompt(mode, *game))
    todo_keys, fresh, errors = list(todo), {}, []
    bar = progress(len(todo)) if progress is not None and todo else None

    def on_reply(index: int, reply: JudgeReply | JudgeError) -> None:
        if bar is not None:
            bar.advance(1)
        if isinstance(reply, JudgeError):
            errors.append(reply)
            return
        key = todo_keys[index]
        fresh[key] = {"judge": judge.name, "kind": kind, "question_id": todo[key][0], **asdict(reply)}
        if cache is not None:
            cache.put(key, fresh[key])

    with bar if bar is not None else nullcontext():
        _complete_all(judge, [prompt for _, prompt in todo.values()], on_reply)
    if errors:
        raise JudgeError(f"{len(errors)} of {len(todo)} judge calls failed ({len(fresh)} succeeded"
                         f"{' and are cached' if cache is not None else ''}); first: {errors[0]}",
                         url=errors[0].url, status=errors[0].status, attempts=errors[0].attempts)
    judgments, calls, made = [], [], set(fresh)
    for key, (question, a, b) in zip(keys, games):
        record = fresh.get(key) or cache.get(key)
        calls.append({"question_id": question.question_id, "model_a": a, "model_b": b, "judge": judge.name,
                      "seconds": record.get("seconds"), "prompt_tokens": record.get("prompt_tokens"),
                      "completion_tokens": record.get("completion_tokens"), "cached": key not in made})
        made.discard(key)  # a second game with the same key made no call of its own
        judgment = _judgment(mode, record["text"], question, a, b, judge.name)
        judgments += [judgment] if judgment is not None else []
    return judgments, len(games) - len(judgments), calls
