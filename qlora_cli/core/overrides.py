"""`--set KEY=VALUE` overrides of a recipe's raw data, and the "did you mean" of every unknown key.

The schema is passed in (`core.recipe.Recipe`): this module only walks it to tell a key from a typo.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import BaseModel

from .errors import Problem
from .yaml_reader import KeyPath, dotted

_SET_PATTERN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|\d+))*)=(.*)$", re.S)

# Names other tools use for keys of ours, for "did you mean" where spelling alone cannot tell.
KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lr": "learning_rate",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "max_length": "max_seq_len", "sequence_len": "max_seq_len",
    "cutoff_len": "max_seq_len", "output_dir": "dir", "model_name_or_path": "base", "base_model": "base",
    "optim": "optimizer", "warmup_ratio": "warmup", "warmup_steps": "warmup", "bnb_4bit_quant_type": "quant_type",
    "load_in_4bit": "bits", "datasets": "train", "dataset": "train",
}


def suggest(name: str, choices: list[str]) -> str:
    """` (did you mean `key`?)` for the choice `name` most likely stands for, or "" when none is close."""
    if KNOWN_ALIASES.get(name) in choices:
        return f" (did you mean `{KNOWN_ALIASES[name]}`?)"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def section_model(schema: type[BaseModel], path: KeyPath) -> type[BaseModel] | None:
    """The pydantic model of `schema` that holds the keys under `path`, or None if `path` is not a section."""
    model: type[BaseModel] = schema
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        candidates = [annotation, *(inner or [])]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: type[BaseModel]
                    ) -> tuple[dict[str, Any], list[Problem], set[KeyPath]]:
    """Apply `--set a.b=value` overrides to the raw recipe data.

    Values are parsed as YAML (`true`, `[q_proj, v_proj]`, `2e-4`) and typed by the schema later.

    Args:
        schema: the recipe's pydantic model, which says which keys exist.

    Returns:
        the updated data, the problems found, and the key paths that were overridden.
    """
    problems: list[Problem] = []
    overridden: set[KeyPath] = set()
    for item in overrides:
        match = _SET_PATTERN.match(item.strip())
        if not match:
            problems.append(Problem(f"`{item}` is not KEY=VALUE with a dotted key (training.learning_rate=1e-4)", key="--set"))
            continue
        dotted_key, raw_value = match.groups()
        path: KeyPath = tuple(int(p) if p.isdigit() else p for p in dotted_key.split("."))
        parent_model = section_model(schema, path[:-1])
        leaf = path[-1]
        if parent_model is None or (isinstance(leaf, str) and leaf not in parent_model.model_fields):
            choices = field_names(parent_model) if parent_model else field_names(schema)
            problems.append(Problem(f"unknown key `{dotted_key}`{suggest(str(leaf), choices)}", key="--set"))
            continue
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError:
            value = raw_value
        cursor: Any = data
        problem = None
        for depth, part in enumerate(path):
            is_leaf = depth == len(path) - 1
            parent = dotted(path[:depth]) or "the recipe"
            if isinstance(part, int):
                if not isinstance(cursor, list) or part >= len(cursor):
                    problem = f"`{dotted_key}`: `{parent}` has no item {part}"
                    break
            elif not isinstance(cursor, dict):
                problem = f"`{dotted_key}`: `{parent}` is not a mapping"
                break
            if is_leaf:
                break
            cursor = cursor[part] if isinstance(part, int) else cursor.setdefault(part, {})
        if problem:
            problems.append(Problem(problem, key="--set"))
            continue
        cursor[leaf] = value
        overridden.add(path)
    return data, problems, overridden
