"""Continuous batching: one model answers many requests at once, each joining and leaving the running batch
between decode steps.

A scheduler thread owns the model. Requests wait in a bounded queue; up to `max_batch` of them run as rows
of one batch that shares a key/value cache. Between two decode steps the scheduler

  - drops the rows whose request ended (an end-of-turn token, its token budget, its client gone);
  - prefills the waiting requests that fit in free rows, together in ONE forward (prompts left-padded,
    masked, each with its own positions), and joins them to the batch: the shorter side's cache is
    left-padded with masked slots;
  - runs ONE forward over all rows, the next token of each, with a padding mask and per-row positions
    (a row's positions count its own tokens only, so left padding does not move its rotary angles);
  - picks each row's next token (greedy, or sampled with the row's temperature, top_p and seeded generator)
    and hands it to the request's `deliver` callback.

A request never waits for the longest one: it leaves the batch the step it ends. Rows may use different
LoRA adapters of one base (peft's `adapter_names`, one per row).

Why not transformers' own continuous batching (`generate_batch`, `init_continuous_batching`): it runs a
4-bit base with a peft adapter on CPU, but packs all requests into one row of a paged cache, so peft cannot
give rows different adapters; and on CPU it took 20-38 s to answer two 8-token prompts on a 2-layer model
that `generate` answers in milliseconds (transformers 5.24, peft 0.21.2, torch 2.13 CPU).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..core import compat

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every row is taken and the queue of waiting requests is full; `retry_after` is a guess of the seconds
    until there is room."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass(frozen=True)
class Finished:
    """The last thing a request is handed: how many tokens it got and whether the last one ended the turn."""

    completion_tokens: int
    ended_at_stop_token: bool


@dataclass
class Failed:
    """Handed to a request instead of `Finished` when the model failed while answering it."""

    error: BaseException


@dataclass(eq=False)
class GenerationRequest:
    """One reply to generate. `deliver` is called from the scheduler thread with a list of new token ids (one
    per step), then exactly once with `Finished` or `Failed`; it must not block."""

    prompt_ids: list[int]
    max_tokens: int
    stop_ids: frozenset[int]
    deliver: Callable[[object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    adapter: Optional[str] = None  # a peft adapter name; None: the model as loaded
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = field(default=False, init=False, repr=False)  # handed `Finished` or `Failed` (set by the scheduler)

    def cancel(self) -> None:
        """Stop this request at the next step (or skip it while queued): its client went away or has enough."""
        self.cancelled.set()


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    generator: Optional[torch.Generator]
    produced: int = 0
    last: int = 0
    length: int = 0  # tokens in this row's cache: prompt + generated (its next position)


def pick_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """The next token of each row from its last logits (rows x vocab): greedy at temperature 0, else
    nucleus sampling as transformers does it (temperature, then the smallest set of tokens whose
    probabilities reach top_p), drawn with the row's own generator."""
    greedy = logits.argmax(dim=-1).tolist()
    picked = []
    for index, row in enumerate(rows):
        request = row.request
        if request.temperature <= 0:
            picked.append(greedy[index])
            continue
        scores = logits[index].float() / request.temperature
        if request.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - request.top_p)
            remove[-1] = False  # keep at least the most likely token
            scores = scores.scatter(0, order, ordered.masked_fill(remove, float("-inf")))
        probabilities = scores.softmax(dim=-1)
        picked.append(int(torch.multinomial(probabilities, 1, generator=row.generator).item()))
    return picked


def left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with `width` zeros added before its start along `dim`."""
    if width <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def join_rows(batch: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
              new: list[tuple[torch.Tensor, torch.Tensor]], new_mask: torch.Tensor):
    """The batch's per-layer (keys, values) [rows, heads, length, dim] and padding mask [rows, length] with
    the new rows added below; the shorter side is left-padded (masked), so every row's tokens stay aligned
    at the right end."""
    length = max(mask.shape[1], new_mask.shape[1])
    grow_old, grow_new = length - mask.shape[1], length - new_mask.shape[1]
    layers = [(torch.cat([left_pad(k, grow_old, 2), left_pad(nk, grow_new, 2)]),
               torch.cat([left_pad(v, grow_old, 2), left_pad(nv, grow_new, 2)]))
              for (k, v), (nk, nv) in zip(batch, new)]
    return layers, torch.cat([left_pad(mask, grow_old, 1), left_pad(new_mask, grow_new, 1)])


def padded_prompts(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, padding mask and positions [rows, longest] of `prompts` read together: each left-padded to
    the longest, its positions counting its own tokens from 0 (so padding does not move its rotary angles)."""
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    positions = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = longest - len(prompt)
        ids[row, start:] = torch.tensor(prompt, dtype=torch.long)
        mask[row, start:] = 1
        positions[row, start:] = torch.arange(len(prompt))
    return ids.to(device), mask.to(device), positions.to(device)


def zero_padding(layers, mask: torch.Tensor):
    """The per-layer (keys, values) with the padded slots (mask 0) set to zero: a padded query attends to
    nothing, and whatever it computed (NaN on some attention kernels) must not reach a masked slot's values,
    where a zero weight times NaN would still be NaN."""
    padding = (mask == 0)[:, None, :, None]
    return [(k.masked_fill(padding, 0), v.masked_fill(padding, 0)) for k, v in layers]


def keep_rows(layers, mask: torch.Tensor, keep: list[int]):
    """Only the rows `keep`, and without the leading columns that are padding in every remaining row."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    return ([(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in layers],
            mask[:, start:])


def shared_start(first, second) -> int:
    """How many leading tokens two token sequences have in common."""
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


class PromptCache:
    """The keys and values of the last prompts read, to start later prompts from: requests through one chat
    template share its start (a system prompt: 24 of SmolLM2's ~46 prompt tokens here), and a conversation's
    next turn repeats the whole earlier one. The keys and values of a position depend only on the tokens up
    to it (and the adapter), so a shared start is read once; only float rounding differs from reading it
    again (the rest of the prompt is read in another shape)."""

    def __init__(self, kept: int = 8, least: int = 8):
        self.kept, self.least = kept, least  # prompts kept; the shortest shared start worth reusing
        self._entries: list[tuple[tuple[int, ...], Optional[str], list]] = []  # newest first

    def find(self, prompts: list[list[int]], adapters: list[Optional[str]]) -> tuple[list, int]:
        """The per-layer (keys, values) [1, heads, length, dim] of a kept prompt and how many of its first
        tokens every one of `prompts` (read with `adapters`) starts with; ([], 0) when none is worth reusing.
        At least one token of each prompt is left to read: its logits give the first reply token."""
        best, best_length = [], 0
        for index, (ids, adapter, layers) in enumerate(self._entries):
            if any(other != adapter for other in adapters):
                continue
            length = min(min(shared_start(ids, prompt), len(prompt) - 1) for prompt in prompts)
            if length > best_length:
                best, best_length, found = layers, length, index
        if best_length < self.least:
            return [], 0
        self._entries.insert(0, self._entries.pop(found))  # used again: kept longest
        return best, best_length

    def keep(self, prompt: list[int], adapter: Optional[str], layers, mask: torch.Tensor, row: int) -> None:
        """Keep the keys and values that `row` of a prefill's cache (`layers`, padding `mask`) holds for `prompt`."""
        if len(prompt) < self.least or any(ids == tuple(prompt) and name == adapter for ids, name, _ in self._entries):
            return
        slots = mask[row].nonzero().squeeze(1)
        kept = [(k[row:row + 1].index_select(2, slots), v[row:row + 1].index_select(2, slots)) for k, v in layers]
        self._entries = [(tuple(prompt), adapter, kept), *self._entries][: self.kept]


class BatchGenerator:
    """The scheduler: a thread that runs `model` over the requests submitted to it, continuously batched.

    Args:
        model: a causal LM, or a peft model; `adapters` names its adapters when rows may choose one.
        max_batch: rows generated together at most.
        max_queue: requests waiting for a row at most, beyond the `max_batch` that run (0: none wait, a request
            is taken only while a row is free); one more is refused with `QueueFull`.
    """

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 64, adapters: tuple[str, ...] = ()):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be at least 1 and max_queue at least 0")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.adapters = tuple(adapters)
        self.device = next(model.parameters()).device
        self._waiting: queue.Queue[GenerationRequest] = queue.Queue()
        # Requests taken and not yet ended (running or waiting): counted at `submit`, not read off the queue,
        # because a request the scheduler has taken off the queue but not yet prefilled still holds a row.
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._rows: list[_Row] = []
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._prefixes = PromptCache()
        self._closed = threading.Event()
        self._step_seconds = 0.05  # a running estimate, for Retry-After
        self._thread = threading.Thread(target=self._run, name="qlora-batch-generator", daemon=True)
        self._thread.start()

    # --- what the server calls ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue `request`.

        Raises:
            QueueFull: `max_queue` requests are already waiting.
            ValueError: the request names an adapter this model does not have.
        """
        if request.adapter is not None and request.adapter not in self.adapters:
            raise ValueError(f"no adapter named {request.adapter!r}")
        with self._admitted_lock:
            if self._admitted >= self.max_batch + self.max_queue or self._closed.is_set():
                waiting = max(0, self._admitted - self.max_batch)
                raise QueueFull(waiting, self.retry_after(waiting))
            self._admitted += 1
        self._waiting.put(request)

    def retry_after(self, waiting: int) -> int:
        """Seconds until a row is likely free: the queue ahead, a few dozen steps each batch, at least 1."""
        batches_ahead = 1 + waiting // self.max_batch
        return max(1, min(60, round(batches_ahead * 32 * self._step_seconds)))

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def _end(self, request: GenerationRequest, outcome: object) -> None:
        """Hand `request` its last message (`Finished` or `Failed`), once; its place is free for another."""
        if request.ended:  # a prefill that fails after some of its requests ended must not end them twice
            return
        request.ended = True
        with self._admitted_lock:
            self._admitted -= 1
        request.deliver(outcome)

    def close(self, timeout: float | None = 10) -> None:
        """Stop the scheduler; requests still running or waiting are ended with `Failed`."""
        self._closed.set()
        self._thread.join(timeout)

    # --- the scheduler thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._admit(block=not self._rows)
                if self._rows:
                    started = time.perf_counter()
                    self._step()
                    self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - started)
            except Exception as error:  # the model failed: its requests fail, the server keeps serving
                log.exception("generation failed")
                self._fail_running(error)
        self._fail_running(RuntimeError("the server is shutting down"))
        while not self._waiting.empty():
            self._end(self._waiting.get_nowait(), Failed(RuntimeError("the server is shutting down")))

    def _fail_running(self, error: BaseException) -> None:
        for row in self._rows:
            self._end(row.request, Failed(error))
        self._rows, self._layers = [], []
        self._mask = self._mask[:0, :0]

    def _admit(self, block: bool) -> None:
        """Prefill the waiting requests that fit in free rows, together; when nothing runs, wait for one
        (waking to notice close)."""
        taken = []
        while len(self._rows) + len(taken) < self.max_batch:
            try:
                request = self._waiting.get(timeout=0.1) if block else self._waiting.get_nowait()
            except queue.Empty:
                break
            block = False
            if request.cancelled.is_set():
                self._end(request, Finished(0, False))
            else:
                taken.append(request)
        if not taken:
            return
        try:
            self._prefill(taken)
        except Exception as error:
            log.exception("prefill failed")
            for request in taken:
                self._end(request, Failed(error))

    def _forward(self, input_ids, attention_mask, position_ids, layers, adapters: list[Optional[str]]):
        """Logits of the last position of each row, and the grown per-layer (keys, values)."""
        extra = {}
        if self.adapters:
            extra["adapter_names"] = [name if name is not None else self.adapters[0] for name in adapters]
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **compat.batch_cache_arguments(self.model, layers, input_ids.shape[1]),
                             **extra)
        return out.logits[:, -1, :], compat.cache_tensors(out)

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Read the prompts of `requests` in one forward, hand each its first token, and join the rows that go
        on to the batch. A start the prompts share with a prompt read before is not read again: its keys and
        values are reused, and only the rest of each prompt goes through the model."""
        adapters = [request.adapter for request in requests]
        reused, shared = self._prefixes.find([request.prompt_ids for request in requests], adapters)
        ids, mask, positions = padded_prompts([request.prompt_ids[shared:] for request in requests], self.device)
        past = []
        if shared:
            past = [(k[:, :, :shared].expand(len(requests), -1, -1, -1).contiguous(),
                     v[:, :, :shared].expand(len(requests), -1, -1, -1).contiguous()) for k, v in reused]
            mask = torch.cat([torch.ones((len(requests), shared), dtype=mask.dtype, device=self.device), mask], dim=1)
            positions = positions + shared
        logits, layers = self._forward(ids, mask, positions, past, adapters)
        if len(requests) > 1:  # a padded slot's keys/values are never attended to; zero them so none is NaN
            layers = zero_padding(layers, mask)
        for row, request in enumerate(requests):
            self._prefixes.keep(request.prompt_ids, request.adapter, layers, mask, row)
        rows = [_Row(request, self._generator(request), length=len(request.prompt_ids)) for request in requests]
        keep = [i for i, (row, token) in enumerate(zip(rows, pick_tokens(logits, rows))) if self._emit(row, token)]
        if not keep:
            return
        if len(keep) < len(rows):
            layers, mask = keep_rows(layers, mask, keep)
        if self._rows:
            self._layers, self._mask = join_rows(self._layers, self._mask, layers, mask)
        else:
            self._layers, self._mask = layers, mask
        self._rows.extend(rows[i] for i in keep)

    def _generator(self, request: GenerationRequest) -> Optional[torch.Generator]:
        """The seeded random generator a sampled request draws its tokens with (None when greedy)."""
        if request.temperature <= 0:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        return generator

    def _emit(self, row: _Row, token: int) -> bool:
        """Hand `token` to the row's request; False when the request has ended (it is told so)."""
        request = row.request
        row.produced += 1
        row.last = token
        request.deliver([token])
        stop = token in request.stop_ids
        if stop or row.produced >= request.max_tokens or request.cancelled.is_set():
            self._end(request, Finished(row.produced, stop))
            return False
        return True

    def _step(self) -> None:
        """One decode step over all rows, then the ended rows leave the batch."""
        live = [i for i, row in enumerate(self._rows) if not row.request.cancelled.is_set()]
        for row in (r for i, r in enumerate(self._rows) if i not in set(live)):
            self._end(row.request, Finished(row.produced, False))
        if len(live) < len(self._rows):
            self._rows = [self._rows[i] for i in live]
            if not self._rows:
                self._layers, self._mask = [], self._mask[:0, :0]
                return
            self._layers, self._mask = keep_rows(self._layers, self._mask, live)
        rows = self._rows
        ids = torch.tensor([[row.last] for row in rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype, device=self.device)], dim=1)
        positions = torch.tensor([[row.length] for row in rows], device=self.device)
        logits, self._layers = self._forward(ids, mask, positions, self._layers, [r.request.adapter for r in rows])
        self._mask = mask
        for row in rows:
            row.length += 1
        keep = [i for i, (row, token) in enumerate(zip(rows, pick_tokens(logits, rows))) if self._emit(row, token)]
        if len(keep) < len(rows):
            self._rows = [rows[i] for i in keep]
            if self._rows:
                self._layers, self._mask = keep_rows(self._layers, self._mask, keep)
            else:
                self._layers, self._mask = [], self._mask[:0, :0]
