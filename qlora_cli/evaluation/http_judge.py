"""A judge behind an OpenAI-compatible chat-completions endpoint, asked at temperature 0, with retries, and
with the API key read from an environment variable at each request and kept nowhere else.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Callable

from .judges import JudgeError, JudgeReply

log = logging.getLogger(__name__)

_RETRYABLE = 429  # and every 5xx
_NO_DETAIL = (401, 403)  # servers echo (part of) the key in auth errors, so their bodies are never shown


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
