"""A model's config.json and the shapes in it that memory depends on: found locally, in the Hugging Face cache,
among the configs shipped with qlora (plans work offline), or fetched from the hub (a few KB); nothing imports
torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import Problem, UserError
from ..train.loss_spec import logits_are_plain

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_HEAD = "lm_head"

_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ModelShapes:
    """The sizes of a Llama/Mistral/Qwen2-style decoder that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: tuple[str, ...]  # which of q/k/v/o_proj carry a bias
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on queries and keys (Qwen3, Gemma 3)
    plain_head: bool = True  # logits are lm_head(hidden), so the chunked loss on trained positions applies
    block_norms: int = 2  # RMSNorms per decoder block: 4 in Gemma 2 and 3 (post-attention and post-MLP norms too)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def _positive_int(key: str, value: Any, source) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(Problem(f"`{key}` must be a positive whole number, got {value!r}", file=source))
    return value


def model_shapes(config: Mapping, source: Path | str | None = None) -> ModelShapes:
    """The shapes in a transformers config dict; `source` names the file in errors.

    Raises:
        UserError: keys missing or not positive integers, or a mixture-of-experts model.
    """
    if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]  # multimodal wrappers keep the language model's config inside
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise UserError(
            Problem(
                f"the model config lacks {', '.join(missing)}; the memory planner understands "
                "Llama/Mistral/Qwen2-style decoder configs",
                file=source,
            )
        )
    if any(isinstance(config.get(key), int) and config[key] > 1 for key in _MOE_KEYS):
        raise UserError(Problem("mixture-of-experts models are not supported by the memory planner", file=source))
    hidden, intermediate, layers, heads, vocab = (_positive_int(key, config[key], source) for key in _REQUIRED_KEYS)
    kv_heads = _positive_int("num_key_value_heads", config.get("num_key_value_heads") or heads, source)
    head_dim = _positive_int("head_dim", config.get("head_dim") or hidden // heads, source)
    model_type = str(config.get("model_type", ""))
    if model_type == "qwen2":
        attention_bias: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # hard-wired in Qwen2's attention
    elif config.get("attention_bias"):
        attention_bias = ("q_proj", "k_proj", "v_proj", "o_proj")
    else:
        attention_bias = ()
    return ModelShapes(
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        # Absent from a config means the model class's default: untied for Llama, Mistral and Qwen2, tied for Gemma.
        tied=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
        attention_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type.startswith("qwen3") or model_type.startswith("gemma3"),
        plain_head=logits_are_plain(config.get),
        block_norms=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
    )


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# config.json of the models the shipped recipes train, and of the bundled model: plans work offline.
SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"


def shipped_config(name: str) -> Path | None:
    """The config.json this package ships for a hub id (org/name) or the bundled model's alias."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    file = SHIPPED_CONFIGS / f"{name.replace('/', '--')}.json"
    return file if file.is_file() else None


def _hub_cache_config(name: str) -> Path | None:
    """config.json of a hub model already in the local Hugging Face cache (never downloads)."""
    if not HUB_ID.fullmatch(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found) if isinstance(found, str) else None


def _downloaded_config(name: str) -> Path | None:
    """config.json fetched from the hub (a few KB), or None offline, for a gated model without a login, or for
    an id the hub does not have."""
    if not HUB_ID.fullmatch(name):
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json"))
    except Exception:  # offline, unknown, gated: huggingface_hub raises a different type for each
        return None


def find_model_config(name: str) -> Path | None:
    """Where a hub model's config.json is: the local Hugging Face cache, the configs shipped here, the hub."""
    return _hub_cache_config(name) or shipped_config(name) or _downloaded_config(name)


def read_model_config(path_or_config) -> dict:
    """A model config as a dict, from a dict, a `config.json` file, a model directory holding one, or a hub
    id (see `find_model_config`).

    Raises:
        UserError: naming the path when it has no config.json, is not JSON, or lacks the needed shapes, and
            `--config` when none can be found.
    """
    if isinstance(path_or_config, Mapping):
        config = dict(path_or_config)
        model_shapes(config)
        return config
    path = Path(path_or_config).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        found = None if path.exists() else find_model_config(str(path_or_config))
        if found is None:
            message = (
                "no config.json in this model directory"
                if path.is_dir()
                else "model config not found: not a local model, not in the Hugging Face cache, not shipped with "
                "qlora, and not fetched from the hub (offline, gated or unknown); pass --config PATH (the model's "
                "config.json or its folder)"
            )
            raise UserError(Problem(message, file=file))
        file = found
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(Problem(f"cannot read the model config: {exc}", file=file)) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(Problem(f"not valid JSON: {exc.msg}", file=file, line=exc.lineno)) from None
    if not isinstance(config, dict):
        raise UserError(Problem("a model config must be a JSON object", file=file))
    model_shapes(config, source=file)
    return config
