"""`qlora serve`: a model behind an OpenAI-compatible HTTP API, for the harnesses people already use
(FastChat, Arena-Hard-Auto, AlpacaEval, lm-evaluation-harness's chat-completions models, the `openai`
client, `qlora eval --judge`).

    POST /v1/chat/completions   messages -> the model's chat template -> a reply; streamed (server-sent
                                events) or not; temperature, top_p, max_tokens, stop, seed
    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded

FastAPI parses and validates requests; uvicorn serves them. Bad requests get 400 and an error object
shaped like OpenAI's. The model generates ONE reply at a time: concurrent requests wait in arrival order
(an `asyncio.Lock`, which is first come, first served) and never share a batch, so each reply is exactly
what the model gives that request alone, at the cost of throughput under load. A waiting request holds
no worker thread (the endpoints are coroutines; only generation runs in a thread), so any number can
queue without starving the one being answered, and a client that goes away, queued or mid-reply, frees
the model: its request is skipped or its generation stopped at the next token. An optional bearer key is
read once, at start, from an environment variable and compared in constant time; it is never printed or
logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, TypeVar, Union

import anyio
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from transformers import StoppingCriteriaList

from ..core.api_keys import read_api_key
from ..core.errors import UserError
from .generate import conversation_ids, load_for_generation, stop_token_ids

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
DISCONNECT_POLL_SECONDS = 0.25  # how often a reply being generated checks that its client is still there

T = TypeVar("T")


class ApiError(Exception):
    """A request the server refuses: rendered as OpenAI's `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        for part in value if isinstance(value, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part["text"] for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat-completions request that this server honours; fields it cannot honour
    are refused when set to anything but their neutral value, and unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Accepted only at their neutral values: a server that silently ignored them would answer a
    # different question from the one asked.
    n: int = 1
    logprobs: Optional[bool] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    tools: Optional[list] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return [stop for stop in stops if stop]

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value):
        if value != 1:
            raise ValueError(f"only n=1 is supported (one choice per request), got {value}")
        return value

    @field_validator("logprobs", "presence_penalty", "frequency_penalty", "tools")
    @classmethod
    def _neutral(cls, value):
        if value:
            raise ValueError(f"not supported by this server (got {value!r}); leave it out")
        return value


@dataclass
class Generated:
    """A finished reply: its text (cut at a stop sequence), why it ended, and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class StopScanner:
    """Cuts text at the first stop sequence, streamed piece by piece: `feed` returns what is safe to send
    now, holding back a tail that could still become the start of a stop sequence; `finish` returns the
    rest. Fed the whole text at once, it gives the same result, so streamed and plain replies agree."""

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending, self.stopped = "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [self.pending.find(stop) for stop in self.stops if stop in self.pending]
        if hits:
            cut, self.stopped = min(hits), True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if self.pending.endswith(stop[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def finish(self) -> str:
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest


class _Cancelled:
    """A stopping criterion that ends generation when `event` is set (a streaming client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TokenStream:
    """Receives the ids `generate` produces (it calls `put` with the prompt first, then each new token,
    then `end`) and hands them to the thread that iterates it, so replies stream token by token."""

    def __init__(self):
        self._queue, self._prompt_seen = queue.Queue(), False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self._queue.get()) is not None:
            yield ids


def decoded_pieces(tokenizer, id_batches) -> Iterator[str]:
    """The text of a growing list of token ids, as the new text each batch adds. Text is held back while
    it ends in an incomplete character (a multi-byte character split across tokens decodes to U+FFFD)."""
    ids, sent = [], ""
    for batch in id_batches:
        ids += batch
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(sent):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text.startswith(sent) and len(text) > len(sent):
        yield text[len(sent):]


class Engine:
    """The loaded model and how it answers one request. Taking turns is the caller's job (`create_app`)."""

    def __init__(self, loaded, default_max_tokens: int = DEFAULT_MAX_TOKENS):
        tokenizer = loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{loaded.description}: the tokenizer has no chat template, which chat completions need")
        self.loaded, self.tokenizer, self.default_max_tokens = loaded, tokenizer, default_max_tokens
        self.stop_ids = stop_token_ids(loaded)
        config = getattr(loaded.model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """The conversation through the model's chat template, ending where the assistant's reply starts.

        Raises:
            ApiError: the template refuses the conversation (some refuse system messages or roles out of order).
        """
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        try:
            return conversation_ids(self.tokenizer, messages)
        except Exception as exc:  # jinja2's TemplateError and whatever a template raises on purpose
            raise ApiError(400, f"the model's chat template refuses these messages: {exc}", param="messages") from None

    def budget(self, request: ChatRequest, prompt_tokens: int) -> int:
        """How many tokens the reply may have.

        Raises:
            ApiError: the prompt and the requested reply do not fit in the model's context.
        """
        asked = request.max_completion_tokens or request.max_tokens
        room = None if self.context is None else self.context - prompt_tokens
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model's context is {self.context}",
                           param="messages", code="context_length_exceeded")
        if asked is None:
            return min(self.default_max_tokens, room) if room is not None else self.default_max_tokens
        if room is not None and asked > room:
            raise ApiError(400, f"max_tokens {asked} + {prompt_tokens} prompt tokens exceed this model's context "
                                f"({self.context})", param="max_tokens", code="context_length_exceeded")
        return asked

    def generate(self, request: ChatRequest, ids: list[int], max_tokens: int, streamer=None,
                 cancel: threading.Event | None = None) -> tuple[list[int], bool]:
        """The generated token ids, and whether generation ended at an end-of-turn token."""
        model = self.loaded.model
        device = next(model.parameters()).device
        if request.seed is not None:
            torch.manual_seed(request.seed)
        sampling = ({"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
                    if request.temperature > 0 else {"do_sample": False})
        extra = {}
        if request.stop:
            extra.update(stop_strings=request.stop, tokenizer=self.tokenizer)
        if cancel is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        inputs = torch.tensor([ids], device=device)
        with torch.no_grad():
            output = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                                    eos_token_id=self.stop_ids, pad_token_id=self.pad_id, streamer=streamer,
                                    **sampling, **extra)
        new = output[0, len(ids):].tolist()
        return new, bool(new) and new[-1] in self.stop_ids

    def prepare(self, request: ChatRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the reply's token budget, checked before anything is sent back.

        Raises:
            ApiError: the template refuses the messages, or they do not fit in the model's context.
        """
        ids = self.prompt_ids(request)
        return ids, self.budget(request, len(ids))

    def complete(self, request: ChatRequest, ids: list[int], budget: int,
                 cancel: threading.Event | None = None) -> Generated:
        """A whole reply (no streaming); cut short when `cancel` is set."""
        new, ended = self.generate(request, ids, budget, cancel=cancel)
        scanner = StopScanner(request.stop or [])
        text = scanner.feed(self.tokenizer.decode(new, skip_special_tokens=True)) + scanner.finish()
        return Generated(text, _finish_reason(ended, scanner.stopped, len(new), budget), len(ids), len(new))

    def stream(self, request: ChatRequest, ids: list[int], budget: int) -> Iterator[str | Generated]:
        """The reply's text piece by piece as the model writes it, then the finished `Generated`."""
        streamer = TokenStream()
        cancel, outcome = threading.Event(), {}

        def work() -> None:
            try:
                outcome["result"] = self.generate(request, ids, budget, streamer=streamer, cancel=cancel)
            except BaseException as exc:  # handed to the streaming thread, which raises it
                outcome["error"] = exc
                streamer.end()

        worker = threading.Thread(target=work, name="generate", daemon=True)
        worker.start()
        scanner = StopScanner(request.stop or [])
        try:
            for piece in decoded_pieces(self.tokenizer, streamer):
                text = scanner.feed(piece)
                if text:
                    yield text
                if scanner.stopped:
                    cancel.set()  # the rest of the reply would be cut off anyway
            rest = scanner.finish()
            if rest:
                yield rest
        finally:
            cancel.set()  # also when the client went away mid-reply: free the model for the next request
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        new, ended = outcome["result"]
        yield Generated("", _finish_reason(ended, scanner.stopped, len(new), budget), len(ids), len(new))


def _finish_reason(ended: bool, stopped: bool, count: int, budget: int) -> str:
    if ended or stopped:
        return "stop"
    return "length" if count >= budget else "stop"


def _usage(generated: Generated) -> dict:
    return {"prompt_tokens": generated.prompt_tokens, "completion_tokens": generated.completion_tokens,
            "total_tokens": generated.prompt_tokens + generated.completion_tokens}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as `field: what is wrong`, and the field as OpenAI's `param`."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(where) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine` as `model_name`; requests must carry `api_key` as a bearer
    token when it is given."""
    app = FastAPI(title="qlora serve", docs_url=None, redoc_url=None, openapi_url=None)
    turn = asyncio.Lock()
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc):
        return ApiError(405, f"method {request.method} not allowed on {request.url.path}").response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):  # starlette logs the traceback itself
        return ApiError(500, f"the server failed to answer: {type(exc).__name__}: {exc}", kind="server_error").response()

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           kind="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "qlora"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model != model_name:
            raise ApiError(404, f"the model `{body.model}` does not exist here; this server serves `{model_name}`",
                           param="model", code="model_not_found")
        # Bad requests fail here, with 400, before any stream starts. Rendering the template and tokenizing
        # take milliseconds: done on the event loop, so a request is in the queue as soon as it is checked.
        ids, budget = engine.prepare(body)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            events = _event_stream(engine, turn, body, ids, budget, completion_id, now, model_name)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async with turn:
            if await request.is_disconnected():  # the client gave up while queued: no one would read the reply
                return ApiError(499, "the client closed the request", code="client_closed_request").response()
            generated = await _unless_gone(request, lambda cancel: engine.complete(body, ids, budget, cancel))
        return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": generated.text},
                             "logprobs": None, "finish_reason": generated.finish_reason}],
                "usage": _usage(generated)}

    return app


async def _unless_gone(request: Request, work: Callable[[threading.Event], T]) -> T:
    """`work(cancel)` in a worker thread; `cancel` is set when the client disconnects meanwhile."""
    cancel = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_SECONDS)
        cancel.set()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            return await run_in_threadpool(work, cancel)
        finally:
            group.cancel_scope.cancel()


async def _event_stream(engine: Engine, turn: asyncio.Lock, body: ChatRequest, ids: list[int], budget: int,
                        completion_id: str, created: int, model_name: str):
    """Server-sent events of a streamed reply, generated when this request's turn comes. Each piece is
    computed in a worker thread; when the client goes away, starlette cancels this generator and the
    reply's generator is closed, which stops generation at the next token."""
    async with turn:
        events = _reply_events(engine, body, ids, budget, completion_id, created, model_name)
        try:
            async for event in iterate_in_threadpool(events):
                yield event
        finally:
            with anyio.CancelScope(shield=True):  # also when cancelled: wait for the model to stop
                await run_in_threadpool(events.close)
    yield "data: [DONE]\n\n"


def _reply_events(engine: Engine, body: ChatRequest, ids: list[int], budget: int, completion_id: str, created: int,
                  model_name: str) -> Iterator[str]:
    """The events of a streamed reply, as OpenAI sends them: a role chunk, content chunks, a chunk with the
    finish reason, and a usage chunk when asked for. An error once the stream has started (the status is
    already sent) comes as an `error` event."""

    def event(choices: list, **extra) -> str:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "choices": choices, **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    try:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for piece in engine.stream(body, ids, budget):
            if isinstance(piece, Generated):
                yield event([{"index": 0, "delta": {}, "finish_reason": piece.finish_reason}])
                if body.stream_options and body.stream_options.include_usage:
                    yield event([], usage=_usage(piece))
            else:
                yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    except Exception as error:
        log.exception("streamed request failed")
        failure = ApiError(500, f"{type(error).__name__}: {error}", kind="server_error")
        yield f"data: {json.dumps(failure.body())}\n\n"


def served_name(reference: str) -> str:
    """The model id to serve under: a run's or a model directory's folder name, a .gguf file's stem, or
    the reference itself (a hub id, the bundled alias)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path.resolve().name
    if path.suffix == ".gguf":
        return path.stem
    return reference


def check_port(host: str, port: int) -> None:
    """Fails early (before a model load) when `host:port` cannot be listened on.

    Raises:
        UserError: the address is taken or not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise UserError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(reference: str, *, host: str, port: int, model_name: str | None, api_key_env: str | None,
          max_tokens: int, say=print) -> None:
    """Load `reference` and serve it until interrupted.

    Raises:
        UserError: the key's environment variable is not set, the address cannot be listened on, or the
            model has no chat template.
    """
    # Both before loading: a missing key or a taken port should not cost a model load.
    api_key = read_api_key(api_key_env)
    check_port(host, port)
    engine = Engine(load_for_generation(reference), default_max_tokens=max_tokens)
    name = model_name or served_name(reference)
    app = create_app(engine, name, api_key)
    exposed = host not in ("127.0.0.1", "localhost", "::1")
    address = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    say(f"Serving `{name}` ({engine.loaded.description}) at http://{address}:{port}/v1 - "
        f"{'a bearer key is required' if api_key else 'no key required'}; one reply is generated at a time, "
        "requests queue in arrival order.")
    if exposed and api_key is None:
        say(f"Warning: listening on {host} without --api-key-env: anyone who can reach this port can use the model.")
    uvicorn.run(app, host=host, port=port, log_level="info")
