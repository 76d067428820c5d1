"""Tokenization with labels, the tokenization cache, and the collators that batch examples.

Labels are the input ids where the loss is taken and IGNORE_INDEX elsewhere. Padding is masked by
position, never by comparing ids with the pad id: many chat models pad with their EOS token, and
masking by id would silently stop the model from learning to end its replies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import DataCollatorWithFlattening

from ..core.errors import UserError
from .formats import Example
from .store import example_digests
from .templates import Segment, render_segments, render_segments_batch, special_token_strings

IGNORE_INDEX = -100
CACHE_VERSION = 3  # 2: rows stored as Arrow, lengths beside them (data/store.py); 3: examples hashed as read


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the model expects a BOS token first: its tokenizer puts one there by default."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt (generation, multiple choice): the text as written, with the BOS training
    puts first when the model uses one, exactly once."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer_adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    return ids


@dataclass
class EncodedTexts:
    """Token ids and labels of several texts laid end to end (int64 arrays): text i's are `[starts[i]:starts[i + 1]]`.

    Kept as arrays rather than a list per text: turning every row into Python lists and back into Arrow costs
    as much as a fifth of the tokenization of short rows."""

    ids: np.ndarray
    labels: np.ndarray
    starts: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def rows(self) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each text, as lists."""
        ids, labels, cuts = self.ids.tolist(), self.labels.tolist(), self.starts.tolist()
        return [(ids[begin:end], labels[begin:end]) for begin, end in zip(cuts, cuts[1:])]


def encode_batch(tokenizer, batch: list[list[Segment]], *, bos_id: int | None) -> list[tuple[list[int], list[int]]]:
    """`encode_texts`, as (input_ids, labels) lists per text."""
    return encode_texts(tokenizer, batch, bos_id=bos_id).rows()


def encode_texts(tokenizer, batch: list[list[Segment]], *, bos_id: int | None) -> EncodedTexts:
    """Token ids and labels of several segmented texts, in one batched tokenizer call.

    Each text is tokenized whole, exactly as the template renders it, and a token is trained when any
    of its characters lies in a trained segment, so a token that merges the last character of a
    prompt with the first of a reply still trains the reply's start. Tokenizing segments one by one
    instead would give different tokens at their seams with SentencePiece tokenizers, which put a
    word-start marker before every piece of text they are given.

    Args:
        bos_id: the BOS id to start with, or None if the model uses none. A template that already
            writes the BOS token keeps its own: there is exactly one either way.
    """
    texts = ["".join(s.text for s in segments) for segments in batch]
    encoded = _ids_and_offsets(tokenizer, texts)
    spans_of_texts = []
    for segments in batch:
        spans, position = [], 0
        for segment in segments:
            if segment.trained:
                spans.append((position, position + len(segment.text)))
            position += len(segment.text)
        spans_of_texts.append(spans)
    counts = np.fromiter((len(ids) for ids, _ in encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(ids for ids, _ in encoded), dtype=np.int64, count=int(counts.sum()))
    labels = _labels_of_batch(encoded, spans_of_texts, [len(text) for text in texts], ids)
    encoded_texts = EncodedTexts(ids, labels, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return _with_bos(encoded_texts, bos_id) if bos_id is not None else encoded_texts


def _with_bos(encoded: EncodedTexts, bos_id: int) -> EncodedTexts:
    """The texts with `bos_id` put first (not trained) where they do not start with it already."""
    lengths = encoded.lengths
    firsts = np.full(len(lengths), -1, dtype=np.int64)  # -1 for an empty text: no token, so no BOS yet
    firsts[lengths > 0] = encoded.ids[encoded.starts[:-1][lengths > 0]]
    missing = (firsts != bos_id).astype(np.int64)
    if not missing.any():
        return encoded
    starts = np.concatenate([[0], np.cumsum(lengths + missing)]).astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    moved = np.arange(len(encoded.ids)) - encoded.starts[rows] + starts[rows] + missing[rows]
    ids = np.full(starts[-1], bos_id, dtype=np.int64)
    labels = np.full(starts[-1], IGNORE_INDEX, dtype=np.int64)
    ids[moved], labels[moved] = encoded.ids, encoded.labels
    return EncodedTexts(ids, labels, starts)


def _ids_and_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, without special tokens.

    A fast tokenizer's own backend is asked directly where it is set to neither truncate nor pad (as the
    tokenizer's call sets it for this request): the same encodings, without converting each into Python
    lists and dicts twice, which costs as much as a third of the tokenization of short rows.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [(encoding.ids, encoding.offsets) for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(encoded["input_ids"], encoded["offset_mapping"]))


def _labels_of_batch(encoded, spans_of_texts: list[list[tuple[int, int]]], text_lengths: list[int],
                     ids: np.ndarray | None = None) -> np.ndarray:
    """`_labels` of every text of a batch, end to end, found at once: the texts are laid end to end, one character
    apart, so that their spans stay sorted and no token of one text can reach a span of another.

    Args:
        ids: the texts' ids end to end, when the caller has them already.
    """
    counts = [len(ids) for ids, _ in encoded]
    total = sum(counts)
    if any(start == end for spans in spans_of_texts for start, end in spans):
        labels = chain.from_iterable(_labels(list(ids), offsets, spans) for (ids, offsets), spans in zip(encoded, spans_of_texts))
        return np.fromiter(labels, dtype=np.int64, count=total)
    bases = np.cumsum([0] + [length + 1 for length in text_lengths[:-1]], dtype=np.int64)
    starts = [base + start for base, spans in zip(bases.tolist(), spans_of_texts) for start, _ in spans]
    ends = [base + end for base, spans in zip(bases.tolist(), spans_of_texts) for _, end in spans]
    if not starts or not total:
        return np.full(total, IGNORE_INDEX, dtype=np.int64)
    if ids is None:
        ids = np.fromiter(chain.from_iterable(ids for ids, _ in encoded), dtype=np.int64, count=total)
    flat = chain.from_iterable(chain.from_iterable(offsets for _, offsets in encoded))
    bounds = np.fromiter(flat, dtype=np.int64, count=2 * total).reshape(-1, 2) + np.repeat(bases, counts)[:, None]
    return _trained_ids(ids, bounds[:, 0], bounds[:, 1], np.array(starts), np.array(ends))


def _trained_ids(ids: np.ndarray, begins: np.ndarray, finishes: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """Each token's id where it overlaps a span (`_overlaps`), else IGNORE_INDEX; spans sorted, none empty."""
    candidate = np.searchsorted(ends, begins, side="right")  # the first span with end > begin: the only candidate
    found = candidate < len(ends)
    start = np.where(found, starts[np.minimum(candidate, len(ends) - 1)], 0)
    trained = found & np.where(begins == finishes, start <= begins, start < finishes)
    return np.where(trained, ids, IGNORE_INDEX)


def _labels(input_ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where any of its characters lies in a trained span (see `_overlaps`), else IGNORE_INDEX.

    Spans come in order and do not overlap, so their ends are sorted too: the first span ending after a
    token's start is the only one that can hold it. Found for all tokens at once with a binary search.
    """
    if not input_ids or not spans:
        return [IGNORE_INDEX] * len(input_ids)
    if any(start == end for start, end in spans):  # an empty span: the token-by-token rule, as written
        return [
            token if any(_overlaps(begin, finish, start, end) for start, end in spans) else IGNORE_INDEX
            for token, (begin, finish) in zip(input_ids, offsets)
        ]
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.array([start for start, _ in spans], dtype=np.int64)
    ends = np.array([end for _, end in spans], dtype=np.int64)
    return _trained_ids(np.asarray(input_ids, dtype=np.int64), bounds[:, 0], bounds[:, 1], starts, ends).tolist()


def _overlaps(begin: int, finish: int, start: int, end: int) -> bool:
    if begin == finish:  # a token with no characters of its own: where it stands decides
        return start <= begin < end
    return begin < end and finish > start


@dataclass
class TokenizeOptions:
    max_seq_len: int
    truncation: str = "right"  # right | left | drop
    train_on_prompt: bool = False


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    dropped_rows: list[str] = field(default_factory=list)


def segments_of(tokenizer, template: str, example: Example, train_on_prompt: bool,
                specials: list[str] | None = None) -> list[Segment]:
    """The segments to tokenize for an example: its conversation rendered, or its own text.

    Args:
        specials: the tokenizer's special tokens as text (`templates.special_token_strings`), when the caller
            renders many examples; found here otherwise.
    """
    if example.messages is not None:
        return render_segments(tokenizer, template, example.messages, train_on_prompt, specials)
    segments = [Segment(s.text, s.trained or train_on_prompt) for s in example.segments]
    if example.add_eos:
        segments.append(Segment(tokenizer.eos_token, segments[-1].trained))
    return segments


def _kept_by_length(encoded: EncodedTexts, options: TokenizeOptions, bos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(each token's keep mask, each text's dropped-too-long flag) under the truncation policy: a text longer than
    `max_seq_len` keeps its first tokens (`right`), its BOS and its last tokens (`left`), or is dropped (`drop`)."""
    limit, lengths = options.max_seq_len, encoded.lengths
    over = lengths > limit
    texts = np.repeat(np.arange(len(lengths)), lengths)  # the text of each token
    position = np.arange(len(encoded.ids)) - encoded.starts[texts]  # its position in its text
    if options.truncation == "drop":
        return ~over[texts], over
    if options.truncation == "left":
        head = np.zeros(len(lengths), dtype=np.int64)
        if bos_id is not None:
            head[over] = encoded.ids[encoded.starts[:-1][over]] == bos_id
        keep = ~over[texts] | (position < head[texts]) | (position >= (lengths - (limit - head))[texts])
        return keep, np.zeros(len(lengths), dtype=bool)
    return position < limit, np.zeros(len(lengths), dtype=bool)


def _rendered(tokenizer, template: str, examples: list[Example], train_on_prompt: bool):
    """(example, segments) of every example that renders, and a problem for each one that does not.

    The conversations are rendered in one batch (`render_segments_batch`); only when the batch fails are they
    rendered one by one, to name every row the template cannot render.
    """
    specials = special_token_strings(tokenizer)
    try:
        batch = iter(render_segments_batch(tokenizer, template, [e.messages for e in examples if e.messages is not None],
                                           train_on_prompt, specials))
    except Exception:  # a Jinja template is user input: any failure is theirs to fix, row by row below
        batch = None
    if batch is not None:
        return [(example, next(batch) if example.messages is not None else
                 segments_of(tokenizer, template, example, train_on_prompt, specials)) for example in examples], []
    rendered, problems = [], []
    for example in examples:
        try:
            rendered.append((example, segments_of(tokenizer, template, example, train_on_prompt, specials)))
        except Exception as error:
            problems.append(example.location.problem(f"the chat template cannot render this row: {error}"))
    return rendered, problems


def tokenize_examples(
    tokenizer, template: str, examples: list[Example], options: TokenizeOptions
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """`tokenize_to_arrow`, each row a dict of `input_ids` and `labels` lists."""
    batch, stats = tokenize_to_arrow(tokenizer, template, examples, options)
    return batch.to_pylist(), stats


def tokenize_to_arrow(tokenizer, template: str, examples: list[Example], options: TokenizeOptions
                      ) -> tuple[pa.RecordBatch, TokenizeStats]:
    """Tokenize every example and apply the length policy; the rows as one record batch of `input_ids` and
    `labels` (int32 lists), in example order.

    Examples left with no trained token (their replies truncated away) are dropped and counted.

    Raises:
        UserError: the template cannot render some examples; names their rows.
    """
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    rendered, problems = _rendered(tokenizer, template, examples, options.train_on_prompt)
    if problems:
        raise UserError(problems[:20], title=f"{len(problems)} row(s) cannot be rendered with the chat template:")
    encoded = encode_texts(tokenizer, [segments for _, segments in rendered], bos_id=bos_id)
    return rows_by_length_policy(encoded, options, bos_id, [example.location for example, _ in rendered])


def rows_by_length_policy(encoded: EncodedTexts, options: TokenizeOptions, bos_id: int | None, locations: Sequence
                          ) -> tuple[pa.RecordBatch, TokenizeStats]:
    """The rows of encoded texts cut (or dropped) by the truncation policy, without those left with no trained
    token, as one record batch of `input_ids` and `labels`; the statistics name each dropped text by its location
    (`str` of `locations[i]`, text i's)."""
    keep, too_long = _kept_by_length(encoded, options, bos_id)
    lengths = encoded.lengths
    texts = np.repeat(np.arange(len(lengths)), lengths)
    kept_lengths = np.bincount(texts[keep], minlength=len(lengths))
    trained = np.bincount(texts[keep & (encoded.labels != IGNORE_INDEX)], minlength=len(lengths))
    untrained = ~too_long & (trained == 0)
    rows = ~too_long & ~untrained
    keep &= rows[texts]
    stats = TokenizeStats(
        examples=int(rows.sum()),
        # Counted whether or not the cut left a trained token, as the drop is counted too.
        truncated=int((~too_long & (kept_lengths < lengths)).sum()),
        dropped_too_long=int(too_long.sum()),
        dropped_no_trained_tokens=int(untrained.sum()),
        tokens=int(kept_lengths[rows].sum()),
        trained_tokens=int(trained[rows].sum()),
        longest=int(kept_lengths[rows].max()) if rows.any() else 0,
        dropped_rows=[str(locations[index]) for index in np.flatnonzero(too_long | untrained)],
    )
    offsets = pa.array(np.concatenate([[0], np.cumsum(kept_lengths[rows])]).astype(np.int32))
    columns = [pa.ListArray.from_arrays(offsets, pa.array(values[keep].astype(np.int32)))
               for values in (encoded.ids, encoded.labels)]
    return pa.record_batch(columns, names=["input_ids", "labels"]), stats


# ---------------------------------------------------------------------------------------------
# Cache: a second run of the same data, tokenizer, template and options does not tokenize again.

def cache_key(tokenizer, template: str, examples: Sequence, options: TokenizeOptions, method_tag: str) -> str:
    """The cache key of tokenizing `examples`: the options, the template, the tokenizer, the examples as they were
    read (`store.example_digests`) and the training method's `cache_tag`."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, template, asdict(options), method_tag]).encode())
    # The tokenizer's full serialization, so a changed vocabulary or normalizer is a new key.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer_adds_bos(tokenizer)]).encode())
    digest.update(example_digests(examples))
    return digest.hexdigest()[:24]


def tokenize_cached(method, tokenizer, template: str, examples, options: TokenizeOptions, cache_folder: Path | None,
                    *, key: str | None = None, progress_factory=None):
    """The training method's tokenization of `examples`, stored memory-mapped (data/store.py) and reused for the
    same inputs.

    Args:
        cache_folder: where entries are kept, by cache key; None tokenizes into a temporary folder.
        key: the cache key, when the caller has it already.
        progress_factory: see `store.tokenize_stored`.

    Returns:
        (rows, stats, cache_hit): rows is a `store.TokenizedRows`, a sequence of dicts read from disk.
    """
    from .store import tokenize_stored

    if cache_folder is not None and key is None:
        key = cache_key(tokenizer, template, examples, options, method.cache_tag)
    return tokenize_stored(method, tokenizer, template, examples, options, cache_folder, key, progress_factory)


# ---------------------------------------------------------------------------------------------
# Collators

class FedTokens:
    """Counts what is fed to the model: every position, and the real (non-padding) tokens.

    Counted when a batch is trained on, not when it is collated: the data loader collates one batch
    ahead, which would count a batch that a stop or a checkpoint never reaches. On a GPU the batch is
    already there, and reading its token count back at once would make the host wait for the device at
    every micro-batch: the count stays on the device until `tokens` is read (at logging and checkpoint
    steps, and on profiled steps).
    """

    def __init__(self, tokens: int = 0, positions: int = 0):
        self._tokens = tokens
        self._pending = None  # a device tensor of tokens counted but not read back yet
        self.positions = positions
        self.last_shape: tuple[int, int] = (0, 0)  # (rows, length) of the last batch, for out-of-memory reports

    def count(self, batch: dict[str, torch.Tensor]) -> None:
        ids = batch["input_ids"]
        self.positions += ids.numel()
        self.last_shape = (int(ids.shape[0]), int(ids.shape[-1]))
        mask = batch.get("attention_mask")
        if mask is None:  # a packed batch has no attention mask and no padding
            self._tokens += ids.numel()
            return
        real = mask.sum()
        self._pending = real if self._pending is None else self._pending + real

    @property
    def tokens(self) -> int:
        if self._pending is not None:
            self._tokens += int(self._pending)
            self._pending = None
        return self._tokens

    @tokens.setter
    def tokens(self, value: int) -> None:
        self._tokens, self._pending = int(value), None

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.positions if self.positions else 0.0


@dataclass
class PadToLongest:
    """Collate examples into a right-padded batch; padding positions get IGNORE_INDEX labels."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PackBatch:
    """Concatenate a batch into one row with no padding (transformers' DataCollatorWithFlattening).

    Position ids restart at 0 for every example and no attention mask is passed, so transformers
    builds a block-diagonal causal mask: no token attends across an example boundary. The first label
    of every example is IGNORE_INDEX, so no example is trained to predict the next one's start.
    """

    def __post_init__(self) -> None:
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return self._flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """The padding fraction of batches (lists of example indices) each padded to its longest."""
    positions = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / positions if positions else 0.0
