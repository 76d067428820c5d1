"""The recipe: one pydantic schema that is the single source of keys, defaults and help text.

`load_recipe` reads a YAML file (safely, with the line of every key: core/yaml_reader.py), applies `--set`
overrides (core/overrides.py), validates everything and reports every problem at once with the file, line and
dotted key path. Nothing here imports torch, so `qlora validate` stays fast.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Problem, UserError
from .overrides import apply_overrides, field_names, section_model, suggest
from .yaml_reader import KeyPath, dotted, read_yaml

BUNDLED_MODEL_ALIAS = "smollm2-135m-instruct"
# Kept in step with data/named_templates.py by a test; listed here so validation needs no import of it.
TEMPLATE_NAMES = ("alpaca", "guanaco", "chatml", "llama3", "llama2", "mistral", "zephyr", "phi3", "gemma")
# Kept in step with train/methods (its MODULES) by a test, for the same reason.
TRAINING_METHODS = ("sft", "dpo", "orpo", "kto")
# The methods that train on preference rows, and the `preference` keys each one reads.
PREFERENCE_KEYS = {
    "dpo": ("beta", "loss", "label_smoothing", "share_prompt"),
    "orpo": ("beta", "share_prompt"),
    "kto": ("beta", "desirable_weight", "undesirable_weight"),
}


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    base: str = Field(
        description=(
            "Base model: a hub id (org/name), a local Hugging Face model directory, a .gguf file, "
            f"or `{BUNDLED_MODEL_ALIAS}` for the bundled SmolLM2-135M-Instruct."
        )
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Only for sources you trust."
    )
    allow_pickle_weights: bool = Field(
        False,
        description=(
            "Also load weights stored as pickle (.bin/.pt), which can run code when loaded. "
            "Off: only safetensors weights load."
        ),
    )
    adapter: Path | None = Field(
        None,
        description=(
            "Continue from an earlier run: its run directory (or its adapter folder), whose LoRA adapter this run "
            "trains further instead of a new one (its rank and targets win over `lora`). For dpo and kto it is "
            "also the reference: loaded a second time, frozen (SFT, then DPO on the SFT model)."
        ),
    )


class QuantizationSection(Section):
    bits: Literal[4, 8, 16] = Field(
        4, description="Bits of the frozen base weights: 4 (QLoRA), 8 (LLM.int8), or 16 (no quantization, plain LoRA)."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: NormalFloat4 (the paper's) or FP4.")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.37 bits per parameter)."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description=(
            "Dtype the 4-bit weights are dequantized to for matmuls. `auto`: bfloat16 on GPUs that support it, "
            "float16 on older GPUs; on CPU bfloat16 where it is native (AVX512-BF16 or AMX), else float32."
        ),
    )


class LoraSection(Section):
    r: int = Field(64, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear",
        description="Modules that get adapters: `all-linear` (every linear layer except the output head) or a list of names.",
    )

    use_dora: bool = Field(
        False,
        description=(
            "DoRA: split each adapted weight into a magnitude vector (trained) and a direction (the LoRA update "
            "applies to it). Slower per step; the merge folds the magnitude in."
        ),
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, which keeps high ranks learning."
    )
    init_lora_weights: Union[bool, str] = Field(
        True,
        description=(
            "How the adapter starts: `true` (B zero, A Kaiming: the update starts at zero), `gaussian` (A Gaussian "
            "scaled by the rank), `orthogonal` (A and B from one orthogonal matrix; even r, unquantized base only), or `loftq` (4-bit "
            "only: the update starts as the rank-r SVD of the quantization error W - dequant(quant(W)), so the "
            "adapted model starts nearer the original weights). PiSSA, OLoRA, EVA, CorDA and MiCA are refused: "
            "they change the base weights or need data before training."
        ),
    )
    modules_to_save: list[str] | None = Field(
        None,
        description=(
            "Modules trained in full beside the adapter, e.g. `[lm_head, embed_tokens]` after adding tokens; "
            "their copies are saved with the adapter and replace the originals when merging."
        ),
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be `all-linear`")
        return value

    @field_validator("init_lora_weights")
    @classmethod
    def _supported_init(cls, value):
        refusal = lora_init_refusal(value)
        if refusal:
            raise ValueError(refusal)
        return value

    @field_validator("modules_to_save")
    @classmethod
    def _named_modules(cls, value):
        if value is not None and (not value or any(not name.strip() for name in value)):
            raise ValueError("must name at least one module (or be left out)")
        return value

    @model_validator(mode="after")
    def _even_rank_for_orthogonal(self) -> "LoraSection":
        if self.init_lora_weights == "orthogonal" and self.r % 2:
            raise ValueError(f"init_lora_weights: orthogonal needs an even r (got r: {self.r})")
        return self


# init_lora_weights values peft has that qlora refuses, and why (peft 0.21).
REFUSED_LORA_INITS = {
    "pissa": "PiSSA moves the principal components out of the base weights, which on a quantized base must then be "
             "re-quantized and stored with the run; qlora keeps the base as published (use `loftq` on a 4-bit base)",
    "olora": "OLoRA subtracts its start from the base weights, which on a quantized base are re-quantized in place; "
             "qlora keeps the base as published (use `loftq` on a 4-bit base)",
    "eva": "EVA needs activations of the training data before training (peft's initialize_lora_eva_weights)",
    "corda": "CorDA needs activations of the training data before training (peft's preprocess_corda)",
    "lora_ga": "LoRA-GA needs gradients of the training data before training",
    "mica": "MiCA freezes B, a variant of LoRA that qlora's merge and plan do not model",
}
LORA_INITS = (True, "gaussian", "orthogonal", "loftq")


def lora_init_refusal(value: Union[bool, str]) -> str | None:
    """Why qlora refuses an `init_lora_weights` value, or None where it trains it."""
    if value in LORA_INITS:
        return None
    if value is False:
        return "false is peft's debugging setting (a random update from the start); use true"
    key = "pissa" if isinstance(value, str) and value.startswith("pissa") else value
    reason = REFUSED_LORA_INITS.get(key) if isinstance(key, str) else None
    if reason:
        return f"{value!r} is refused: {reason}"
    return f"unknown initialisation {value!r}; use one of true, gaussian, orthogonal, loftq"


DataFormat = Literal["auto", "alpaca", "chat", "oasst", "input-output", "prompt-completion", "text", "preference",
                     "hh-rlhf", "kto"]


class DataSource(Section):
    path: Path | None = Field(
        None,
        description=(
            "A local .jsonl, .json, .csv, .tsv or .parquet file, or a folder of them. "
            "Relative paths resolve against the recipe's folder."
        ),
    )
    hub: str | None = Field(None, description="A Hugging Face hub dataset id instead of `path` (needs network access).")
    subset: str | None = Field(None, description="The hub dataset's subset (configuration) name.")
    split: str = Field("train", description="The hub dataset's split.")
    streaming: bool = Field(
        False,
        description=(
            "Read the hub split row by row over the network (`datasets` streaming) instead of downloading it whole "
            "into the Hugging Face cache first: for splits larger than the disk should hold. Rows are still checked, "
            "and tokenized into qlora's cache, before training."
        ),
    )
    format: DataFormat = Field(
        "auto",
        description=(
            "`alpaca` (instruction, input, output), `chat` (`messages` role/content or ShareGPT `conversations` "
            "from/value), `oasst` (`text` as `### Human: ... ### Assistant: ...`), `input-output` (template-free "
            "`segments` of {text, label}), `prompt-completion`, `text` (raw text, loss on all of it); for preference "
            "methods `preference` (prompt, chosen, rejected: strings or messages, or two whole conversations), "
            "`hh-rlhf` (chosen and rejected `\\n\\nHuman:`/`\\n\\nAssistant:` texts), `kto` (prompt, completion, "
            "true/false label); or `auto` to tell each row's format from its columns."
        ),
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns to the names the format expects, as `{expected: actual}`, e.g. `{output: answer}`.",
    )
    weight: float | None = Field(
        None, gt=0, description="Repeat (above 1) or subsample (below 1) this source's rows in the mixture."
    )
    samples: int | None = Field(
        None, ge=1, description="Use exactly this many rows of this source (sampled with the seed; repeated if fewer)."
    )

    @model_validator(mode="after")
    def _one_origin(self) -> "DataSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` and `hub`")
        if self.weight is not None and self.samples is not None:
            raise ValueError("give at most one of `weight` and `samples`")
        if self.streaming and self.hub is None:
            raise ValueError("`streaming` reads hub datasets; a local file is read a line or a batch at a time already")
        return self


class DataSection(Section):
    train: list[DataSource] = Field(min_length=1, description="Training sources, each with its format.")
    eval: list[DataSource] = Field(default_factory=list, description="Evaluation sources (instead of `eval_size`).")
    eval_size: float = Field(
        0,
        ge=0,
        description="Hold out this many training rows (1 or more) or this fraction (below 1) for evaluation, with the seed.",
    )
    max_seq_len: int = Field(512, ge=8, description="Longest example in tokens; see `truncation` for longer ones.")
    truncation: Literal["right", "left", "drop"] = Field(
        "right",
        description="Longer examples: `right` keeps their start, `left` keeps their end (and the BOS), `drop` skips them.",
    )
    template: str = Field(
        "auto",
        description=(
            "Chat template: `auto` (the tokenizer's own, else `guanaco`), `tokenizer`, a name ("
            + ", ".join(f"`{name}`" for name in TEMPLATE_NAMES)
            + "), or a Jinja chat template string."
        ),
    )
    train_on_prompt: bool = Field(False, description="Compute the loss on prompts too, not only on responses.")
    packing: bool = Field(
        False,
        description=(
            "Concatenate each batch into one row with no padding; position ids restart per example so no "
            "example attends to another."
        ),
    )
    group_by_length: bool = Field(
        True, description="Without packing, batch examples of similar length together to waste less on padding."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A bad data row stops the run before the model loads (`error`) or is counted and skipped."
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value in ("auto", "tokenizer", *TEMPLATE_NAMES) or "{{" in value or "{%" in value:
            return value
        raise ValueError(
            f"unknown template {value!r}{suggest(value, ['auto', 'tokenizer', *TEMPLATE_NAMES])}; "
            "use a name or a Jinja chat template string"
        )

    @model_validator(mode="after")
    def _one_eval(self) -> "DataSection":
        if self.eval and self.eval_size:
            raise ValueError("give `eval` sources or `eval_size`, not both")
        if self.eval_size >= 1 and self.eval_size != int(self.eval_size):
            raise ValueError("an `eval_size` of 1 or more is a number of rows and must be whole")
        return self


class MmluSection(Section):
    data: Path = Field(description="An MMLU-layout folder (dev/ and test/ CSVs) or a JSONL file of multiple-choice rows.")
    shots: int = Field(5, ge=0, le=5, description="Few-shot examples per question, from the dev split.")
    limit: int | None = Field(None, ge=1, description="Score at most this many test questions per subject.")


class TrainingSection(Section):
    method: Literal[TRAINING_METHODS] = Field(
        "sft",
        description=(
            "Training method: `sft` (supervised fine-tuning: cross-entropy on the responses), `dpo` (Direct "
            "Preference Optimization on chosen/rejected pairs, against the base with the adapter off), `orpo` "
            "(odds-ratio preference optimization: no reference model), `kto` (Kahneman-Tversky optimization on "
            "answers labelled desirable or not). The preference methods read the `preference` section."
        ),
    )
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(1, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(16, ge=1, description="Steps accumulated before each optimizer update.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer updates to run; overrides `epochs` when set."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when `max_steps` is not set).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warmup."
    )
    warmup: float = Field(
        0.03, ge=0, description="Linear warmup: a fraction of the updates if below 1, else a number of updates."
    )
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = Field(
        "paged_adamw_32bit", description="Optimizer; the paged ones spill optimizer state to CPU memory under pressure."
    )
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto",
        description=(
            "Recompute activations in the backward pass: much less memory, about a third more compute. "
            "`auto`: on only when the memory plan says the run does not fit without it."
        ),
    )
    seed: int = Field(0, ge=0, description="Seed for initialisation, dropout and data order.")
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate every this many updates.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description=(
            "With several processes (`qlora train --nproc N`, torchrun, accelerate launch): `ddp` replicates the "
            "model on every device; `fsdp` shards the frozen 4-bit base and the LoRA weights with FSDP2."
        ),
    )
    eval_mmlu: MmluSection | None = Field(
        None,
        description="Multiple-choice accuracy (MMLU-style) at every evaluation and at the end, as the paper tracked.",
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate on the eval rows every this many updates (none: once, at the end)."
    )
    save_steps: int | None = Field(
        None,
        ge=1,
        description=(
            "Write a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) to "
            "RUN_DIR/checkpoints/step-N every this many updates (none: only when interrupted)."
        ),
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description=(
            "Experiment trackers, through the Trainer's integrations (rank 0 logs): `tensorboard` (RUN_DIR/tensorboard), "
            "`mlflow` (RUN_DIR/mlflow.db, or MLFLOW_TRACKING_URI), `wandb` (offline into RUN_DIR/wandb unless logged "
            "in). Each is an extra: pip install 'qlora-cli[NAME]'."
        ),
    )

    @field_validator("warmup")
    @classmethod
    def _warmup_steps_whole(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a warmup of 1 or more is a number of updates and must be a whole number")
        return value


class PreferenceSection(Section):
    beta: float = Field(
        0.1,
        gt=0,
        description=(
            "dpo, kto: how far the trained model may move from the reference (the temperature of the implicit "
            "reward; lower allows more); orpo: the weight λ of the odds-ratio term beside the chosen answer's NLL."
        ),
    )
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description=(
            "dpo only: `sigmoid` (the paper's), `ipo` (squared, length-averaged), `hinge` (SLiC), `robust` "
            "(unbiased under label noise `label_smoothing`)."
        ),
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo only, with loss sigmoid (conservative DPO) or robust: the probability that a pair's labels are flipped.",
    )
    share_prompt: bool = Field(
        True,
        description=(
            "dpo, orpo: read each pair's prompt once for both answers (one row per pair, an attention mask keeping "
            "the answers apart): every pass holds and computes the prompt's positions once instead of twice. "
            "Applies where the model's attention takes such a mask (sdpa, eager; no sliding window); false: the "
            "two answers are separate padded rows, as TRL batches them."
        ),
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto only: weight of the losses of desirable answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto only: weight of the losses of undesirable answers.")


class OutputSection(Section):
    dir: Path | None = Field(
        None,
        description=(
            "Run directory. Relative paths resolve against the recipe's folder; "
            "unset: `runs/<recipe name>` in the current directory."
        ),
    )
    merge: bool = Field(
        False,
        description=(
            "After training, also write a merged bfloat16 checkpoint with a parity report into RUN_DIR/merged "
            "(as `qlora merge RUN_DIR`; run that for other dtypes or bases)."
        ),
    )


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    preference: PreferenceSection = Field(
        default_factory=PreferenceSection, description="Settings of the preference methods (dpo, orpo, kto)."
    )
    output: OutputSection = Field(default_factory=OutputSection)


# ---------------------------------------------------------------------------------------------
# Validation errors -> problems with locations

def _field_path(loc: tuple, data: Any) -> KeyPath:
    """The key path of a validation error's location.

    pydantic adds union member tags such as "list[str]" to `loc`; those are neither keys of the data
    nor fields of the schema, and are dropped (a user's own odd key, like `out@put`, is kept).
    """
    path: list[Union[str, int]] = []
    cursor: Any = data
    for part in loc:
        model = section_model(Recipe, tuple(path))
        if isinstance(part, int) and isinstance(cursor, list):
            path.append(part)
            cursor = cursor[part] if part < len(cursor) else None
        elif isinstance(cursor, dict) and part in cursor:
            path.append(part)
            cursor = cursor[part]
        elif model is not None and part in model.model_fields:
            path.append(part)  # a missing field
            cursor = None
    return tuple(path)


def _allowed_keys(path: KeyPath) -> list[str]:
    model = section_model(Recipe, path)
    return field_names(model) if model else []


def _problem_for(error: dict, source: Path, data: Any, lines: dict[KeyPath, int], overridden: set[KeyPath]) -> Problem:
    path = _field_path(error["loc"], data)
    kind = error["type"]
    if kind == "extra_forbidden" and path:
        allowed = _allowed_keys(path[:-1])
        message = f"unknown key{suggest(str(path[-1]), allowed)}; allowed here: {', '.join(allowed)}"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = error["msg"].removeprefix("Value error, ")
        if "input" in error and not isinstance(error["input"], (dict, list)):
            message = f"{message} (got {error['input']!r})"
    if path in overridden:
        return Problem(message, key=f"--set {dotted(path)}")
    line = None
    for depth in range(len(path), -1, -1):
        if path[:depth] in lines:
            line = lines[path[:depth]]
            break
    return Problem(message, file=source, line=line, key=dotted(path) or None)


def _merge_union_problems(problems: list[Problem]) -> list[Problem]:
    """A value that fits no member of a union yields one error per member: say them in one line."""
    merged: dict[tuple, Problem] = {}
    for problem in problems:
        slot = (problem.file, problem.line, problem.key)
        if slot in merged:
            previous = merged[slot]
            merged[slot] = Problem(f"{previous.message}; or {problem.message}", previous.file, previous.line, previous.key)
        else:
            merged[slot] = problem
    return list(merged.values())


# ---------------------------------------------------------------------------------------------
# Paths

def _resolve(path: Path, base_dir: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith(".gguf") or "\\" in value


def _resolve_and_check(recipe: Recipe, source: Path, lines: dict[KeyPath, int]) -> list[Problem]:
    """Resolve relative paths against the recipe's folder, check that input files exist, and check
    combinations of keys that no single field can judge."""
    base_dir = source.parent.resolve()
    problems: list[Problem] = []

    def where(path: KeyPath) -> dict:
        return {"file": source, "line": lines.get(path), "key": dotted(path)}

    for section in ("train", "eval"):
        for index, item in enumerate(getattr(recipe.data, section)):
            if item.path is None:
                continue
            item.path = _resolve(item.path, base_dir)
            if not item.path.exists():
                problems.append(Problem(f"data path not found: {item.path}", **where(("data", section, index, "path"))))
    base = recipe.model.base
    if base != BUNDLED_MODEL_ALIAS:
        candidate = _resolve(Path(base), base_dir)
        if candidate.exists():
            recipe.model.base = str(candidate)
        elif _looks_like_path(base):
            problems.append(Problem(f"model not found: {candidate}", **where(("model", "base"))))
        elif not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base):
            problems.append(
                Problem(
                    f"`{base}` is neither an existing path, a hub id (org/name) nor `{BUNDLED_MODEL_ALIAS}`",
                    **where(("model", "base")),
                )
            )
    if recipe.training.eval_mmlu is not None:
        mmlu = recipe.training.eval_mmlu
        if (base_dir / mmlu.data).exists() or mmlu.data.is_absolute() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(mmlu.data)):
            mmlu.data = _resolve(mmlu.data, base_dir)
        if not mmlu.data.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(recipe.training.eval_mmlu.data)):
            problems.append(Problem(f"multiple-choice data not found: {mmlu.data}", **where(("training", "eval_mmlu", "data"))))
    if recipe.output.dir is not None:
        recipe.output.dir = _resolve(recipe.output.dir, base_dir)
    problems += preference_problems(recipe, where)
    if recipe.model.adapter is not None:
        recipe.model.adapter = _resolve(recipe.model.adapter, base_dir)
        if not recipe.model.adapter.exists():
            problems.append(Problem(f"adapter not found: {recipe.model.adapter}", **where(("model", "adapter"))))
    quant = recipe.quantization
    if recipe.lora.init_lora_weights == "loftq" and quant.bits != 4:
        problems.append(Problem(
            "loftq starts the adapter from the error of 4-bit quantization, and quantization.bits is "
            f"{quant.bits}; use true or set quantization.bits: 4", **where(("lora", "init_lora_weights"))))
    if recipe.lora.init_lora_weights == "orthogonal" and quant.bits != 16:
        # peft 0.21's orthogonal_init casts its start to the base weight's dtype: uint8/int8 for a quantized base.
        problems.append(Problem(
            "orthogonal needs an unquantized base (peft casts its start to the base weight's dtype, which is an "
            f"integer type at quantization.bits: {quant.bits}); use gaussian, loftq or true",
            **where(("lora", "init_lora_weights"))))
    if quant.bits != 4 and quant.quant_type != "nf4":
        problems.append(
            Problem("only applies to bits: 4; remove it or set quantization.bits: 4", **where(("quantization", "quant_type")))
        )
    return problems


def preference_problems(recipe: Recipe, where) -> list[Problem]:
    """`preference` keys set to other than their defaults that the recipe's training method does not read (a run's
    own recipe.yaml writes every key with its value, so a default is never a problem)."""
    method = recipe.training.method
    settings = recipe.preference
    changed = {key for key, value in settings.model_dump().items() if value != PreferenceSection.model_fields[key].default}
    if method not in PREFERENCE_KEYS:
        if changed:
            return [Problem(f"training.method {method} reads no `preference` keys; remove the section or use one of "
                            + ", ".join(PREFERENCE_KEYS), **where(("preference",)))]
        return []
    problems = []
    for key in sorted(changed - set(PREFERENCE_KEYS[method])):
        users = ", ".join(name for name, keys in PREFERENCE_KEYS.items() if key in keys)
        problems.append(Problem(f"does not apply to training.method {method} (only to {users}); remove it",
                                **where(("preference", key))))
    if method == "dpo" and settings.label_smoothing and settings.loss not in ("sigmoid", "robust"):
        problems.append(Problem(f"applies to loss sigmoid or robust, not {settings.loss}",
                                **where(("preference", "label_smoothing"))))
    return problems


def default_run_dir(source: Path) -> Path:
    return (Path.cwd() / "runs" / source.stem).resolve()


# ---------------------------------------------------------------------------------------------

def load_recipe(path: Path | str, overrides: list[str] | None = None, output_dir: Path | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe.

    Args:
        path: the recipe YAML file.
        overrides: `--set KEY=VALUE` strings, applied in order.
        output_dir: `--output-dir`, which wins over `output.dir`.

    Returns:
        the validated recipe with absolute paths and `output.dir` set.

    Raises:
        UserError: with every problem found, each with file, line and key path.
    """
    source = Path(path)
    data, lines = read_yaml(source)
    data, problems, overridden = apply_overrides(data, overrides or [], Recipe)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += _merge_union_problems([_problem_for(e, source, data, lines, overridden) for e in exc.errors()])
        raise UserError(problems, title=f"{source}: the recipe has {len(problems)} problem(s):") from None
    problems += _resolve_and_check(recipe, source, lines)
    if problems:
        raise UserError(problems, title=f"{source}: the recipe has {len(problems)} problem(s):")
    if output_dir is not None:
        recipe.output.dir = Path(output_dir).expanduser().resolve()
    elif recipe.output.dir is None:
        recipe.output.dir = default_run_dir(source)
    return recipe


def with_change(recipe: Recipe, section: str, key: str, value: Any) -> Recipe:
    """A copy of the recipe with one key changed (validated like the original)."""
    copy = recipe.model_copy(deep=True)
    setattr(getattr(copy, section), key, value)
    return copy


def flatten(recipe: Recipe) -> list[tuple[str, Any, str]]:
    """(dotted key, value, help text) for every leaf of the recipe, in schema order."""
    rows: list[tuple[str, Any, str]] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                walk(value, key + ".")
            elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
                for index, item in enumerate(value):
                    walk(item, f"{key}.{index}.")
            else:
                rows.append((key, value, field.description or ""))

    walk(recipe, "")
    return rows


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, loadable again by `load_recipe`."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation)).replace("Path", "path")


def reference_markdown() -> str:
    """The recipe reference for the README: every key with its type, default and help, from the schema."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
            key = f"{prefix}{name}"
            if nested and annotation is nested[0]:
                walk(nested[0], key + ".")
                continue
            if nested:  # a list of sections, such as data.train
                rows.append(f"| `{key}` | list | required | {field.description} |")
                walk(nested[0], f"{key}[].")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = f"`{json.dumps(value)}`" if not isinstance(value, Path) else f"`{value}`"
            rows.append(f"| `{key}` | {_type_name(annotation)} | {default} | {field.description} |")

    walk(Recipe, "")
    return "\n".join(rows) + "\n"
