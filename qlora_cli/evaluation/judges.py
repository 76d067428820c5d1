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
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

from ..errors import Problem, UserError
from .judgments import Comparison, ScorePair, Winner
from .questions import Question

log = logging.getLogger(__name__)

Mode = Literal["pairwise", "relative"]
Answer = str | Sequence[str]  # one string, or one string per turn of a multi-turn question

_INSTRUCTION = (
    "[Instruction]\nAct as an impartial judge of two AI assistants. Below is a user's question (or a "
    "conversation of several user turns) and the answers of Assistant A and Assistant B. Judge how helpful, "
    "relevant, accurate, deep and detailed each answer is, and whether it does what the user asked; for a "
    "conversation, judge every turn. Do not let the order in which the answers appear, their length or the "
    "assistants' names sway you: judge the content only.\n"
)
PAIRWISE = _INSTRUCTION + (
    "Compare the two answers and explain your reasoning briefly and objectively. Then give your verdict on "
    "the last line in exactly this form: [[A]] if Assistant A is better, [[B]] if Assistant B is better, "
    "or [[C]] if they are equally good. Write no other text in double brackets.\n\n{dialogue}"
)
RELATIVE = _INSTRUCTION + (
    "Give each answer an overall score from 1 to 10, where a higher score means a better answer. Your "
    "FIRST line must hold only the two scores, in exactly this form:\nScore A: <score> Score B: <score>\n"
    "Then, from the second line on, explain your scores.\n\n{dialogue}"
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
    """The question and both answers as the judge sees them. An answer with one string per turn is shown as
    a conversation; a single string is shown after all the turns.

    Raises:
        ValueError: an answer has several strings, but not one per turn.
    """
    parts = []
    answers = {"A": _as_turns(answer_a), "B": _as_turns(answer_b)}
    if any(len(a) not in (1, len(question.turns)) for a in answers.values()):
        raise ValueError(f"question {question.question_id}: an answer must be one string or one per turn")
    if all(len(a) == 1 for a in answers.values()):
        for number, turn in enumerate(question.turns, start=1):
            label = "User Question" if len(question.turns) == 1 else f"User Question, turn {number}"
            parts.append(f"[{label}]\n{turn}\n")
        for name, (text,) in answers.items():
            parts.append(f"[The Start of Assistant {name}'s Answer]\n{text}\n[The End of Assistant {name}'s Answer]\n")
        return "\n".join(parts)
    for name, replies in answers.items():
        lines = [f"[The Start of Assistant {name}'s Conversation with User]"]
        if len(replies) == 1:
            replies = ("",) * (len(question.turns) - 1) + replies
        for turn, reply in zip(question.turns, replies):
            lines += ["", "### User:", turn, "", f"### Assistant {name}:", reply]
        parts.append("\n".join(lines + [f"[The End of Assistant {name}'s Conversation with User]\n"]))
    return "\n".join(parts)


def build_prompt(mode: Mode, question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """The full judge prompt: the PAIRWISE or RELATIVE instruction with the dialogue filled in."""
    return TEMPLATES[mode].format(dialogue=render_dialogue(question, answer_a, answer_b))


def prompt_kind(mode: Mode) -> str:
    """`mode` plus a digest of its template, so that editing a prompt never reuses replies to the old one."""
    return f"{mode}:{hashlib.sha256(TEMPLATES[mode].encode()).hexdigest()[:12]}"


def cache_key(judge: str, kind: str, question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """sha256 of everything a reply depends on; JSON, so no choice of separator can make two inputs collide."""
    fields = [judge, kind, question.question_id, list(question.turns), list(_as_turns(answer_a)), list(_as_turns(answer_b))]
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

    def __repr__(self) -> str:
        return f"HttpJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _request(self, prompt: str) -> urllib.request.Request:
        # The key lives only in this frame and in the request's headers, which no message or repr shows.
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise JudgeError(f"{self.url}: the environment variable {self.api_key_env} with the API key is not set",
                                 url=self.url)
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _detail(self, error: urllib.error.HTTPError) -> str:
        """A short excerpt of an error body, with the key blanked out in case the server echoes it."""
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
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        text = text.replace(key, "[redacted]") if key else text
        return f": {' '.join(text.split())[:200]}" if text.strip() else ""

    def _reply(self, payload: bytes, seconds: float) -> JudgeReply:
        try:
            data = json.loads(payload)
            text = data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: the reply is not a chat completion (no choices[0].message.content)",
                             url=self.url, status=200, attempts=1) from None
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
            status, wait = None, None
            try:
                with urllib.request.urlopen(self._request(prompt), timeout=self.timeout) as response:
                    payload = response.read()
                return self._reply(payload, time.monotonic() - start)
            except urllib.error.HTTPError as error:
                status, wait, reason = error.code, _retry_after(error.headers.get("Retry-After")), self._detail(error)
                error.close()
                if status != _RETRYABLE and status < 500:
                    raise JudgeError(f"{self.url}: HTTP {status}{reason} (attempt {attempt}, not retried)",
                                     url=self.url, status=status, attempts=attempt) from None
                what = f"HTTP {status}{reason}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                what = f"connection failed: {getattr(error, 'reason', None) or error or type(error).__name__}"
            if attempt == attempts:
                break
            delay = min(self.max_wait, wait if wait is not None else self.backoff * 2 ** (attempt - 1))
            log.warning("judge %s: %s (attempt %d of %d); retrying in %.1f s", self.url, what, attempt, attempts, delay)
            time.sleep(delay)
        raise JudgeError(f"{self.url}: gave up after {attempts} attempts; last: {what}",
                         url=self.url, status=status, attempts=attempts)

    def complete_many(self, prompts: list[str],
                      on_reply: Callable[[int, JudgeReply | JudgeError], None] | None = None) -> list[JudgeReply | JudgeError]:
        """Replies in the order of `prompts`, at most `concurrency` requests in flight; a failed call is its
        JudgeError. `on_reply(index, result)` is called as each call ends, from a worker thread."""
        def one(index: int, prompt: str) -> JudgeReply | JudgeError:
            try:
                result = self.complete(prompt)
            except JudgeError as error:
                result = error
            if on_reply is not None:
                on_reply(index, result)
            return result

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, range(len(prompts)), prompts))
