"""What the preference methods (dpo.py, orpo.py, kto.py) share: reading and tokenizing their rows, batching them,
the log-probability of each answer under the trained model and under the reference, and the seam's other duties.

The reference model costs no second copy of the base: it is the same 4-bit base with the adapter switched off, or,
when the run continues an earlier run's adapter (`model.adapter`), that adapter loaded a second time, frozen, under
the name `reference` (train/model.py) and switched on in place of the trained one for the reference pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

from ...core import compat
from ..model import REFERENCE_ADAPTER
from ...core.recipe import PreferenceSection
from ...data.preference import prompt_length, to_preference_example, tokenize_preferences
from ...data.tokenize import IGNORE_INDEX
from ..loss import base_model_of, linear_cross_entropy, output_head, trained_targets



def pad_rows(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, labels (IGNORE_INDEX on padding) and attention mask of (ids, labels) sequences."""
    longest = max(len(ids) for ids, _ in sequences)
    count = len(sequences)
    input_ids = torch.full((count, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((count, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((count, longest), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def shared_prompt_length(chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]]) -> int:
    """How many leading tokens a pair's two (ids, labels) sequences have alike, none of them trained: its prompt,
    which the model needs to read only once for both answers."""
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = chosen, rejected
    limit = min(prompt_length(chosen_labels), prompt_length(rejected_labels))
    shared = 0
    while shared < limit and chosen_ids[shared] == rejected_ids[shared]:
        shared += 1
    return shared


# The part of a shared-prompt row each position belongs to (`segments`): the rejected answer attends to the prompt
# and to itself, never to the chosen one before it.
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


def scored_targets(ids: list[int], labels: list[int], place) -> tuple[list[int], list[int]]:
    """(where in the batch each trained token of a sequence is predicted, the token): position t predicts label
    t+1; `place(t)` is where the sequence's position t lies in the batch."""
    scored = [(place(t), labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
    return [where for where, _ in scored], [token for _, token in scored]


def shared_prompt_rows(pairs: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]],
                       pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of pairs as one row per pair: the prompt once, the chosen answer, then the rejected one, at the
    positions each would have alone (`position_ids`), with the part of the row each token belongs to
    (`segments`) from which `sequence_logps` builds the attention mask. Every pass then reads the prompt once
    instead of twice (and no answer is padded to the other's length), so a step's activations and compute
    shrink by the prompt's share of the pair.

    `labels` marks each row's trained tokens (for counting; not to be shifted across an answer's start): what
    is scored is `pair_predictors` (flat indices into the batch), `pair_targets` and `pair_target_counts`, the
    chosen answers of every pair first, then the rejected ones, as in a padded batch of 2B sequences.
    """
    layouts = []
    for chosen, rejected in pairs:
        shared = shared_prompt_length(chosen, rejected)
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = chosen, rejected
        seam = len(chosen_ids) - shared  # how far the rejected answer's positions sit from where they would alone
        layouts.append((chosen_ids + rejected_ids[shared:], chosen_labels + rejected_labels[shared:],
                        list(range(len(chosen_ids))) + list(range(shared, len(rejected_ids))),
                        [PROMPT] * shared + [CHOSEN] * seam + [REJECTED] * (len(rejected_ids) - shared),
                        scored_targets(chosen_ids, chosen_labels, lambda t: t),
                        scored_targets(rejected_ids, rejected_labels,
                                       lambda t, shared=shared, seam=seam: t if t < shared else t + seam)))
    longest = max(len(ids) for ids, *_ in layouts)
    batch = pad_rows([(ids, labels) for ids, labels, *_ in layouts], pad_token_id)
    batch["position_ids"] = torch.zeros((len(layouts), longest), dtype=torch.long)
    batch["segments"] = torch.full((len(layouts), longest), PADDING, dtype=torch.long)
    predictors, targets, counts = [], [], []
    for answer in (4, 5):  # every chosen answer, then every rejected one
        for row, layout in enumerate(layouts):
            where, tokens = layout[answer]
            predictors += [row * longest + index for index in where]
            targets += tokens
            counts.append(len(tokens))
    for row, (ids, _, positions, segments, *_) in enumerate(layouts):
        batch["position_ids"][row, : len(ids)] = torch.tensor(positions)
        batch["segments"][row, : len(ids)] = torch.tensor(segments)
    batch["pair_predictors"] = torch.tensor(predictors, dtype=torch.long)
    batch["pair_targets"] = torch.tensor(targets, dtype=torch.long)
    batch["pair_target_counts"] = torch.tensor(counts, dtype=torch.long)
    return batch


def shared_prompt_attention(segments: torch.Tensor) -> torch.Tensor:
    """[batch, query, key]: True where a query of a shared-prompt row may attend a key: causally, within its own
    answer or the prompt. A padding position attends only to itself, so that no row of the attention is empty."""
    length = segments.shape[1]
    index = torch.arange(length, device=segments.device)
    causal = index[None, :] <= index[:, None]
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (key != PADDING) & ((key == PROMPT) | (key == query))
    return allowed | torch.eye(length, dtype=torch.bool, device=segments.device)


@dataclass
class PairBatch:
    """A batch of pairs: with `share_prompts`, one row per pair whose prompt is read once (`shared_prompt_rows`);
    otherwise one padded batch of 2B sequences, the B chosen answers then the B rejected ones, so that one
    forward pass scores both."""

    pad_token_id: int
    share_prompts: bool = False

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        chosen = [(f["chosen_input_ids"], f["chosen_labels"]) for f in features]
        rejected = [(f["rejected_input_ids"], f["rejected_labels"]) for f in features]
        if self.share_prompts:
            return shared_prompt_rows(list(zip(chosen, rejected)), self.pad_token_id)
        return pad_rows(chosen + rejected, self.pad_token_id)


def scored_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the positions whose prediction is scored, [rows, length] booleans; for each scored token, the index of
    its position among those; the tokens; how many belong to each sequence)."""
    if "pair_predictors" not in batch:
        mask, targets = trained_targets(batch["labels"])
        return mask, torch.arange(len(targets), device=targets.device), targets, mask.sum(dim=1)
    predictors = batch["pair_predictors"]
    kept = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool, device=predictors.device)
    kept[predictors] = True  # a prompt's last position predicts both answers' first token: it is kept once
    rank = kept.cumsum(0) - 1
    return kept.view_as(batch["input_ids"]), rank[predictors], batch["pair_targets"], batch["pair_target_counts"]


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the causal LM is called with: a shared-prompt batch gives its positions and its attention mask."""
    if "segments" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base = base_model_of(extract_model_from_parallel(model))
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": compat.custom_attention_mask(shared_prompt_attention(batch["segments"]), base)}


def sequence_logps(model, head, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's trained tokens, their count), one value per sequence of the
    batch (a shared-prompt batch holds two per row).

    With a plain output head (`head`) only the scored positions are projected onto the vocabulary, a chunk at a
    time (train/loss.py); each sequence's sum is the negated chunked cross-entropy of its own positions, so no
    logits of the whole batch are ever held. Otherwise the model's own logits are used.
    """
    kept, rows, targets, counts = scored_positions(batch)
    inputs = model_inputs(model, batch)
    if head is None:
        logits = model(**inputs).logits.float()
        token_logps = logits[kept][rows].log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        return torch.stack([piece.sum() for piece in token_logps.split(counts.tolist())]), counts
    with compat.output_projection_skipped(base_model_of(extract_model_from_parallel(model)), head):
        hidden = model(**inputs, logits_to_keep=kept).logits
    compat.check_kept_hidden_states(hidden, int(kept.sum()), head.in_features)
    hidden = hidden[rows]
    sizes = counts.tolist()
    logps = [-linear_cross_entropy(pieces, head.weight, piece_targets, 1.0)
             for pieces, piece_targets in zip(hidden.split(sizes), targets.split(sizes))]
    return torch.stack(logps), counts


@contextmanager
def reference_model(model):
    """The model as the reference: the adapter being trained off, or the frozen `reference` adapter on in its place
    (and no dropout). The unwrapped model is yielded: the reference pass computes no gradients, and data-parallel
    wrappers only need to see the pass that does."""
    peft_model = extract_model_from_parallel(model)
    if REFERENCE_ADAPTER not in getattr(peft_model, "peft_config", {}):
        with torch.no_grad(), peft_model.disable_adapter():
            yield peft_model
        return
    trained = peft_model.active_adapter
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), compat.peft_adapter_switched(peft_model, REFERENCE_ADAPTER, trained):
            yield peft_model
    finally:
        peft_model.train(was_training)


class PreferenceMethod:
    """The parts of the TrainingMethod contract every preference method has alike."""

    name = ""
    metric_names: tuple[str, ...] = ()
    # The row layouts the method reads (data/preference.py), and whether it trains on unpaired rows.
    formats: tuple[str, ...] = ("preference", "hh-rlhf")
    unpaired = False

    def __init__(self, recipe=None) -> None:
        self.head = None
        self.settings = recipe.preference if recipe is not None else PreferenceSection()
        self.share_prompts = False  # decided by `prepare`, from the model's attention

    def read_row(self, row, location, data_format, columns):
        return to_preference_example(row, location, data_format, columns, self.formats)

    @property
    def cache_tag(self) -> str:
        # An unpaired method splits each pair into two rows: other rows from the same examples.
        return self.name if self.unpaired else ""

    def tokenize(self, tokenizer, template, examples, options):
        return tokenize_preferences(tokenizer, template, examples, options, unpaired=self.unpaired)

    def row_length(self, row) -> int:
        return max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))

    def row_lengths(self, batch) -> list[int]:
        return [self.row_length(row) for row in batch.to_pylist()]

    def collator(self, tokenizer, data):
        return PairBatch(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                         self.share_prompts)

    def prepare(self, model) -> None:
        self.head = output_head(model)
        self.share_prompts = self.settings.share_prompt and compat.attention_takes_a_custom_mask(base_model_of(model))

    def preview(self, row):
        return [("chosen", row["chosen_input_ids"], row["chosen_labels"]),
                ("rejected", row["rejected_input_ids"], row["rejected_labels"])]

    def parity_prompts(self, rows):
        return [row["chosen_input_ids"] for row in rows]

    def policy_and_reference_logps(self, trainer, model, batch):
        """(policy log-probs, reference log-probs, trained-token counts) of every sequence of the batch. The
        reference pass runs first, so that switching adapters never touches a graph being built."""
        compat.loss_is_a_mean_per_micro_batch(trainer)
        with reference_model(model) as reference:
            reference_logps, _ = sequence_logps(reference, self.head, batch)
        policy_logps, counts = sequence_logps(model, self.head, batch)
        return policy_logps, reference_logps, counts
