"""Merging: a full-precision checkpoint that computes what the trained model (4-bit base + adapter) computed,
written a tensor at a time, so that no step of the merge holds the model (the GGUF export after it does).

The adapter learned against dequant(quant(W)), not W. So by default the LoRA delta is added to the
dequantized 4-bit (or 8-bit) weights (`base: dequantized`); `base: original` adds it to the original weights,
as reloading the 16-bit base and calling peft's merge does, and the parity report says how far that drifts.
Nothing is ever merged into quantized weights and re-quantized.

The merge loads neither the trained model nor the merged one whole (streaming.py):
1. the trained model is built on the meta device with the adapter's weights, and run on the parity prompts a
   decoder layer at a time, each layer read from the base checkpoint and quantized exactly as `from_pretrained`
   quantizes it (on the GPU when there is one);
2. while a layer is in memory, each of its weights is dequantized (`base: original`: read again as stored),
   given its LoRA delta (peft's `get_delta_weight`), cast, and added to the output shard being filled, which is
   written and freed when full;
3. the merged checkpoint is read back a layer at a time for the same prompts, and the two sets of logits are
   compared.
With GGUF files asked for (`--gguf`), the export then loads the merged checkpoint whole, in float32
(export/gguf.py), and the memory the merge says it needs counts that.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download, split_torch_state_dict_into_shards
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from rich.console import Console
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .. import __version__
from ..core import compat
from ..core.console import Steps
from ..core.cpu import return_freed_memory
from ..core.context import RunContext, inference_context
from ..data.sources import load_datasets
from ..data.tokenize import TokenizeOptions, tokenize_examples
from ..core.errors import Problem, UserError
from .gguf import check_exportable, export_gguf_files
from .merge_plan import MergeSettings, check_fits, merge_needs
from ..core.models import quantization_config
from .parity import ParityReport, compare_logits
from ..plan.configs import read_model_config
from ..plan.sizes import parse_bytes
from ..core.recipe import Recipe
from ..core.files import remove_abandoned_staging, staged
from ..core.rundir import (
    ADAPTER, MERGE_REPORT, MERGED, PARITY_PROMPT_COUNT, PARITY_PROMPT_TOKENS, PARITY_PROMPTS, RECIPE, adapter_base_model,
    is_run_dir, read_run_recipe,
)
from .streaming import (INDEX_FILE, SINGLE_FILE, CheckpointFiles, LayerHooks, StreamedWeights, decoder_layers,
                        move_buffers, streamed_logits)

# The merge is checked against the trained model computed in float32, which a float32 merge into the dequantized
# base reproduces up to float32 rounding (KL ~1e-15 on the test model): KL_LIMIT is far above that and far below
# what a wrong merge gives. A checkpoint in a 16-bit dtype also computes in it, so its limit adds
# ROUNDING_ALLOWANCE times the KL that computing the trained model itself in that dtype gives (its rounding noise,
# measured on the same prompts). The merged weights are rounded once more than the trained model's (W + BA to 16
# bits, where training kept BA's path in float32); that measured about 1x the noise (the quickstart run and the
# test model), so 4x leaves room without letting a wrong merge through.
KL_LIMIT = 1e-3  # nats per token
ROUNDING_ALLOWANCE = 4
REFERENCE_DTYPE = torch.float32
# The shard being filled is the merge's largest buffer; 1 GB keeps a merge within a few GB of memory whatever
# the model's size, at the cost of more files (130 for a 65B model in 16 bits).
DEFAULT_MAX_SHARD_SIZE = "1GB"
SHARD_PATTERN = "model{suffix}.safetensors"


# ---------------------------------------------------------------------------------------------
# The two models, on the meta device

def download_base(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    """The hub model's folder in the Hugging Face cache, with its JSON files (and, for a model trusted to run its
    own code, its Python files) and the safetensors weights transformers loads: the shards its index names, else
    model.safetensors. Other safetensors files of the repository stay on the hub (Mistral-7B-Instruct-v0.3 also
    holds its weights again in one 14.5 GB file).

    Raises:
        UserError: no such model, or an unreadable index.
    """
    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except Exception as exc:  # hub errors come in many types; all mean the same here
            raise UserError(f"the run's base model {repo_id} cannot be found: {exc}") from None

    described = ["*.json", "*.py"] if trust_remote_code else ["*.json"]
    folder = fetch(described)
    weights = [SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        weights = sorted({file.name for file in CheckpointFiles(folder).file_of.values()})  # the index's shards
    return fetch(described + weights)


def base_checkpoint(base_path: str, revision: str | None, trust_remote_code: bool = False) -> CheckpointFiles:
    """The safetensors files of the base model: a local folder, or a hub id's download in the Hugging Face cache.

    Raises:
        UserError: no such model, or a model with pickle weights only (a merge reads safetensors).
    """
    folder = Path(base_path)
    if not folder.is_dir():
        folder = download_base(base_path, revision, trust_remote_code)
    try:
        return CheckpointFiles(folder)
    except UserError as error:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UserError(f"{folder} has pickle weights only; a merge reads safetensors: convert the base model "
                            "with `save_pretrained(..., safe_serialization=True)` and train from that") from None
        raise error


def empty_model(config, dtype: torch.dtype, trust_remote_code: bool):
    """The causal LM of `config` on the meta device, its parameters in `dtype`. It gets a copy of the config,
    which quantizing the model would otherwise mark as quantized."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does once loaded; built on the meta device, the model is left untied
    return model


@dataclass
class TrainedModel:
    """The trained model (quantized base + adapter) on the meta device, its adapter's weights in memory."""

    model: torch.nn.Module  # the PeftModel
    weights: StreamedWeights  # of the base model, read from its checkpoint and quantized as when training
    lora_of: dict[int, torch.nn.Module]  # id(adapted layer of the base) -> its peft LoRA layer
    compute_dtype: torch.dtype  # the run's: what the base's weights were cast to before they were quantized
    # id(module of the base) -> its copy trained in full (lora.modules_to_save), which the merge writes instead
    saved_of: dict[int, torch.nn.Module]


def trained_model(config, files: CheckpointFiles, run_dir: Path, recipe: Recipe, context: RunContext,
                  device, computed_in: torch.dtype | None = None) -> TrainedModel:
    """The run's model as `load_run` loads it, but with nothing of the base in memory.

    Args:
        computed_in: the dtype it computes in (default: the run's compute dtype). Its quantized weights are
            the trained ones whatever this is (cast to the run's compute dtype, then quantized); its other
            weights are read in this dtype.

    Raises:
        UserError: a damaged adapter.
    """
    dtype = context.compute_dtype
    computed_in = computed_in or dtype
    model = empty_model(config, computed_in, recipe.model.trust_remote_code)
    quantization = quantization_config(recipe.quantization, computed_in)
    if quantization is not None:
        compat.quantize_skeleton(model, quantization, computed_in)
        compat.keep_4bit_training_kernels(model)

    def make_parameter(slot, files):
        # As from_pretrained loads: every weight cast to the model's dtype, the linear ones then quantized
        # (from the run's compute dtype, so that they are the weights that were trained against).
        if compat.is_quantized_weight(slot.placeholder):
            return compat.quantize_like_transformers(files.read(slot.name, dtype, device), slot.placeholder, device)
        return torch.nn.Parameter(files.read(slot.name, slot.placeholder.dtype, device), requires_grad=False)

    weights = StreamedWeights(model, files, make_parameter)
    move_buffers(model, device)
    adapter = run_dir / ADAPTER
    try:
        peft_config = PeftConfig.from_pretrained(adapter)
        peft_config.inference_mode = True
        with compat.peft_reading_deprecated_flags(), compat.dora_magnitudes_left_to_load():
            peft_model = PeftModel(model, peft_config, low_cpu_mem_usage=True)
        compat.load_adapter_onto_skeleton(peft_model, adapter, device)
    except compat.LibraryChanged:
        raise
    except Exception as exc:  # peft and safetensors raise several types for a damaged adapter
        raise UserError(Problem(f"cannot load the adapter: {exc}", file=adapter)) from None
    peft_model.eval()
    lora_of = {id(module.get_base_layer()): module for module in peft_model.modules() if isinstance(module, LoraLayer)}
    saved_of = {id(wrapper.original_module): wrapper.modules_to_save[wrapper.active_adapters[0]]
                for wrapper in peft_model.modules() if isinstance(wrapper, ModulesToSaveWrapper)}
    return TrainedModel(peft_model, weights, lora_of, dtype, saved_of)


def merged_model(config, files: CheckpointFiles, dtype: torch.dtype, device, trust_remote_code: bool):
    """The merged checkpoint as a model on the meta device, and its weights read from `files`."""

    def make_parameter(slot, files):
        return torch.nn.Parameter(files.read(slot.name, slot.placeholder.dtype, device), requires_grad=False)

    model = empty_model(config, dtype, trust_remote_code).eval()
    weights = StreamedWeights(model, files, make_parameter)
    move_buffers(model, device)
    return model, weights


# ---------------------------------------------------------------------------------------------
# The merged tensors

def output_tensors(model) -> dict[str, torch.Tensor]:
    """What the merged checkpoint holds, by name, in the model's order: its state dict (meta tensors giving
    shapes and dtypes) with a tied weight under its first name only, as `save_pretrained` writes it."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def adapted_weight(weight: torch.Tensor, lora) -> torch.Tensor:
    """The float32 weight the layer's active adapters compute with, from its base weight (float32): W + ΔW for
    LoRA; for DoRA, W + ΔW rescaled row by row to the trained magnitude m, m (W + ΔW) / ||W + ΔW|| (the norm of
    each output row), as DoRA's forward computes it and peft merges it."""
    for adapter in lora.active_adapters:
        combined = weight + lora.get_delta_weight(adapter).float()
        if adapter in lora.lora_magnitude_vector:
            magnitude = lora.lora_magnitude_vector[adapter].weight.float()
            combined = (magnitude / combined.norm(p=2, dim=1))[:, None] * combined
        weight = combined
    return weight


def dequantized_weight(trained: TrainedModel, slot, module, attribute: str, files: CheckpointFiles, device,
                       held: bool) -> torch.Tensor:
    """The weight the trained model computes with in float32: the quantized weight `module` holds (`held`), or
    the original read and quantized as when training; dequantized."""
    quantized = getattr(module, attribute) if held else compat.quantize_like_transformers(
        files.read(slot.name, trained.compute_dtype, device), slot.placeholder, device)
    try:
        if compat.is_4bit_weight(quantized):
            return compat.dequantize_4bit_in_float32(quantized)
        return compat.dequantize_8bit(quantized, getattr(module, "state", None)).float()
    finally:
        if not held:
            compat.forget_quantization_state(module)


def merged_tensor(name: str, trained: TrainedModel, files: CheckpointFiles, buffers: dict, base: str,
                  dtype: torch.dtype, device, held: bool = False) -> torch.Tensor:
    """One tensor of the merged checkpoint, on the CPU in `dtype`.

    Args:
        held: the tensor's layer is in memory, quantized as when training (see streaming.LayerHooks).
    """
    slot = trained.weights.by_name.get(name)
    if slot is None:  # a persistent buffer: the checkpoint's value if it has one, else the model's own
        value = files.read(name) if name in files else buffers[name]
        return value.to(dtype) if value.is_floating_point() else value
    module, attribute = slot.owners[slot.owner_names.index(name)]  # of a tied weight, the module named so
    saved = trained.saved_of.get(id(module))
    if saved is not None:  # trained in full: its copy is the merged tensor
        return getattr(saved, attribute).detach().to(dtype).cpu()
    lora = trained.lora_of.get(id(module)) if attribute == "weight" else None
    if base == "dequantized" and compat.is_quantized_weight(slot.placeholder):
        weight = dequantized_weight(trained, slot, module, attribute, files, device, held)
    elif lora is not None:
        weight = files.read(slot.name, torch.float32, device)
    else:
        return files.read(slot.name, dtype)
    if lora is not None:
        weight = adapted_weight(weight, lora)
    return weight.to(dtype).cpu()


def adapted_tied_weights(trained: TrainedModel) -> list[list[str]]:
    """The names of each weight that several modules share (tied) and an adapter changes in one of them."""
    return [slot.owner_names for slot in trained.weights.slots
            if len(slot.owners) > 1
            and any(id(module) in trained.lora_of or id(module) in trained.saved_of for module, _ in slot.owners)]


def merged_config(config, trained: TrainedModel):
    """The merged model's config: the base's, with its word embeddings untied when the adapter changes a tied
    weight (a LoRA on a tied output head changes the head alone, which one shared tensor cannot hold; peft's own
    merge would add the head's update to the input embedding too)."""
    if not adapted_tied_weights(trained):
        return config
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False
    return config


class ShardWriter:
    """The merged weights as safetensors shards of at most `max_shard_bytes` (a larger tensor gets one of its own)
    and their index, named as `save_pretrained` names them. Tensors come one at a time, in any order; a shard is
    written, and its tensors freed, as soon as it has all of them."""

    def __init__(self, folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int):
        self.folder = folder
        self.split = split_torch_state_dict_into_shards(tensors, filename_pattern=SHARD_PATTERN,
                                                        max_shard_size=max_shard_bytes)
        self.waiting = {file: set(names) for file, names in self.split.filename_to_tensors.items()}
        self.filling: dict[str, dict[str, torch.Tensor]] = {}
        self.parameters = sum(tensor.numel() for tensor in tensors.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        file = self.split.tensor_to_filename[name]
        self.filling.setdefault(file, {})[name] = tensor.contiguous()
        self.waiting[file].discard(name)
        if not self.waiting[file]:
            shard = self.filling.pop(file)
            save_file({name: shard[name] for name in self.split.filename_to_tensors[file]}, self.folder / file,
                      metadata={"format": "pt"})

    def close(self) -> int:
        """Write the index (for several shards); returns the number of shards."""
        missing = sorted(name for names in self.waiting.values() for name in names)
        if missing:
            raise RuntimeError(f"merged tensors never produced: {', '.join(missing[:3])}")  # a bug here, not the user's
        if self.split.is_sharded:
            index = {"metadata": {"total_parameters": self.parameters, **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return len(self.split.filename_to_tensors)


class LayerMerger:
    """Merges the output while the trained model's streamed forward holds its layers (streaming.LayerHooks): the
    tensors before the decoder layers once the forward has gone past them, each layer's while it is in memory
    (its quantized weights as the trained model holds them), the rest after the layers. So the memory held is
    one shard and one layer, and merging into the dequantized base (the default) reads and quantizes the base
    once; `base: original` reads the layers' original weights a second time, to merge into them."""

    def __init__(self, folder: Path, trained: TrainedModel, files: CheckpointFiles, config, *, base: str,
                 dtype: torch.dtype, device, max_shard_bytes: int, trust_remote_code: bool):
        model = empty_model(config, dtype, trust_remote_code)
        self.model = model  # on the meta device: what the output is written as
        tensors = output_tensors(model)
        for names in adapted_tied_weights(trained):
            if not all(name in tensors for name in names):
                raise UserError(f"the adapter changes {' and '.join(names)}, which this model ties together even "
                                "with tie_word_embeddings: false, so no merged checkpoint can hold both; nothing was "
                                "merged. Train without a LoRA on a tied weight (lora.target_modules)")
        self.buffers = dict(model.named_buffers())
        self.writer = ShardWriter(folder, tensors, max_shard_bytes)
        self.trained, self.files, self.base, self.dtype, self.device = trained, files, base, dtype, device
        self.of_layer = [[name for slot in trained.weights.within(layer) for name in slot.owner_names if name in tensors]
                         for layer in decoder_layers(trained.model)]
        in_layers = {name for names in self.of_layer for name in names}
        order = list(tensors)
        first = next(index for index, name in enumerate(order) if name in in_layers)
        self.leading = [name for name in order[:first] if name not in in_layers]
        self.trailing = [name for name in order[first:] if name not in in_layers]

    def merge(self, names: list[str], held: bool = False) -> None:
        for name in names:
            self.writer.add(name, merged_tensor(name, self.trained, self.files, self.buffers, self.base, self.dtype,
                                                self.device, held))

    def hooks(self, steps: Steps) -> LayerHooks:
        return LayerHooks(
            before_layers=lambda: self.merge(self.leading),
            while_held=lambda index, layer: self.merge(self.of_layer[index], held=True),
            after_layers=lambda: self.merge(self.trailing),
            on_layer=lambda done, total: steps.advance(1, f"layer {done} of {total}"),
        )


def write_configs(folder: Path, base_folder: Path, config, dtype: torch.dtype, model, tokenizer) -> None:
    """config.json (in the merged dtype), generation_config.json, the code of a model defined by its own code,
    and the run's tokenizer, as `save_pretrained` of `model` (the merged model on the meta device) writes them
    beside the weights."""
    config = copy.deepcopy(config)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    if model.is_remote_code():
        compat.save_remote_code(model, folder, config)
    config.save_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(base_folder)
    except OSError:  # the base has none: the one transformers derives from the model's config
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# Before starting: the prompts, and what the merge needs

def parity_prompts(run_dir: Path, recipe: Recipe, tokenizer) -> tuple[list[list[int]], str]:
    """Token ids of a few rows the model trained on (held-out rows first), as the run kept them
    (RUN_DIR/parity_prompts.json), and a description of where they came from.

    A run trained before runs kept them has its data read and tokenized again, as it was then.

    Raises:
        UserError: the run kept no prompts and its data cannot be read any more.
    """
    kept = run_dir / PARITY_PROMPTS
    if kept.is_file():
        try:
            stored = json.loads(kept.read_text())
            return [list(map(int, ids)) for ids in stored["prompts"]], stored["from"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(Problem(f"cannot read the prompts the merge is checked on: {exc}", file=kept)) from None
    try:
        datasets = load_datasets(recipe.data, recipe.training.seed)
    except UserError:
        raise UserError(f"{run_dir}: the run's data cannot be read any more, so there are no prompts to check the merge on") from None
    held_out = bool(datasets.eval)
    examples = (datasets.eval if held_out else datasets.train)[:PARITY_PROMPT_COUNT]
    options = TokenizeOptions(max_seq_len=PARITY_PROMPT_TOKENS, truncation="right")
    rows, _ = tokenize_examples(tokenizer, tokenizer.chat_template, examples, options)
    where = "evaluation rows" if held_out else "training rows (the run has no evaluation rows)"
    return [row["input_ids"] for row in rows], f"the first {len(rows)} {where}, at most {PARITY_PROMPT_TOKENS} tokens each"


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot be written, or that holds something a merge must not replace: never
    overwrite a folder that is not a merged model.

    Raises:
        UserError: `out` or a folder above it is a file; `out` is a non-empty folder that is not a merge, or a
            merge and `overwrite` is off.
    """
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"--out: {existing} is a file, not a folder; choose another --out")
    if existing != out or not any(out.iterdir()):
        return
    if not (out / MERGE_REPORT).is_file():
        raise UserError(f"--out: {out} is a non-empty folder that is not a merged model; choose another --out")
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out DIR")


def available_host_memory() -> int:
    """Memory the operating system can give this process now, page cache included (MemAvailable)."""
    return int(psutil.virtual_memory().available)


def available_device_memory(context: RunContext) -> int | None:
    if context.device != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(context.local_rank)
    return int(free)


def check_needs(model_folder: Path, recipe: Recipe, context: RunContext, *, dtype: torch.dtype, max_shard_bytes: int,
                prompt_tokens: int, gguf_types: tuple[str, ...], out: Path, say) -> None:
    """Say what the merge needs, from the config.json in `model_folder`, and refuse when this machine lacks it.
    A config the planner does not understand (a mixture of experts, other shape keys) gets no estimate.

    Raises:
        UserError: not enough memory, GPU memory or disk, with the figures.
    """
    settings = MergeSettings(
        bits=recipe.quantization.bits, double_quant=recipe.quantization.double_quant, lora_r=recipe.lora.r,
        target_modules=recipe.lora.target_modules, compute_bytes=context.compute_dtype.itemsize,
        out_bytes=dtype.itemsize, max_shard_bytes=max_shard_bytes,
        prompt_tokens=prompt_tokens, on_gpu=context.device == "cuda", gguf_types=gguf_types,
    )
    try:
        needs = merge_needs(read_model_config(model_folder), settings)
    except UserError as error:  # an architecture the planner does not know: merge without the estimate
        say(f"No memory estimate for this model ({error}); merging without one")
        return
    say(f"The merge needs {needs.describe()}")
    folder = next(path for path in (out, *out.parents) if path.exists())  # where the output will be
    check_fits(needs, host_available=available_host_memory(), device_available=available_device_memory(context),
               disk_free=shutil.disk_usage(folder).free, disk_folder=str(folder))


# ---------------------------------------------------------------------------------------------
# The merge

def merged_logits(folder: Path, dtype: torch.dtype, prompts: list[list[int]], device, console,
                  trust_remote_code: bool) -> list[torch.Tensor]:
    """The merged checkpoint's logits on the prompts, read back a layer at a time."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model, weights = merged_model(config, CheckpointFiles(folder), dtype, device, trust_remote_code)
    count = len(decoder_layers(model))
    with Steps(console, "Merged checkpoint read back on the parity prompts", count, transient=True) as steps:
        hooks = LayerHooks(on_layer=lambda done, total: steps.advance(1, f"layer {done} of {total}"))
        return streamed_logits(model, weights, prompts, device, hooks)


@contextmanager
def quiet_8bit_matmuls():
    with warnings.catch_warnings():
        # bitsandbytes says on every 8-bit matmul that it casts the inputs to float16, as training did
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        yield


def trained_logits(config, files: CheckpointFiles, run_dir: Path, recipe: Recipe, context: RunContext, device,
                   computed_in: torch.dtype, prompts: list[list[int]], console) -> list[torch.Tensor]:
    """The trained model's logits on the prompts with its unquantized parts computing in `computed_in`, a
    layer at a time (its quantized weights read and quantized once more, as when training)."""
    model = trained_model(config, files, run_dir, recipe, context, device, computed_in)
    count = len(decoder_layers(model.model))
    with Steps(console, f"The trained model computed in {dtype_label(computed_in)} on the parity prompts", count,
               transient=True) as steps, quiet_8bit_matmuls():
        hooks = LayerHooks(on_layer=lambda done, total: steps.advance(1, f"layer {done} of {total}"))
        return streamed_logits(model.model, model.weights, prompts, device, hooks)


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parity_limit(dtype: torch.dtype, noise: dict[torch.dtype, ParityReport]) -> float:
    """The largest mean KL a merged checkpoint in `dtype` may have from the trained model computed in float32:
    KL_LIMIT, plus ROUNDING_ALLOWANCE times the rounding noise of computing in `dtype` (none in float32)."""
    rounding = noise[dtype].mean_kl if dtype in noise and dtype != REFERENCE_DTYPE else 0.0
    return KL_LIMIT + ROUNDING_ALLOWANCE * rounding


def limit_rule(dtype: torch.dtype, noise: dict[torch.dtype, ParityReport]) -> str:
    if dtype == REFERENCE_DTYPE:
        return f"{KL_LIMIT:g} for a {dtype_label(dtype)} merge"
    return (f"{KL_LIMIT:g} + {ROUNDING_ALLOWANCE} x {noise[dtype].mean_kl:.3g}, the KL of the trained model computed "
            f"in {dtype_label(dtype)}")


def noise_entries(noise: dict[torch.dtype, ParityReport], trained_dtype: torch.dtype) -> dict:
    """The report's lines on rounding noise: how far the trained model computed in its own compute dtype (and,
    for a 16-bit merge of a run trained in another dtype, in the merge's dtype) is from it computed in float32."""
    entries = {"trained_dtype": dtype_label(trained_dtype)}
    for dtype, report in noise.items():
        prefix = "trained_dtype_noise" if dtype == trained_dtype else f"{dtype_label(dtype)}_noise"
        entries[f"{prefix}_max_abs_logit_diff"] = report.max_abs_logit_diff
        entries[f"{prefix}_mean_kl_nats_per_token"] = report.mean_kl
    return entries


def merge_run(
    run_dir: Path,
    *,
    out: Path | None = None,
    dtype_name: str = "bfloat16",
    base: str = "dequantized",
    overwrite: bool = False,
    gguf_types: tuple[str, ...] = (),
    max_shard_size: str | None = None,
    console=None,
) -> dict:
    """Merge a run's adapter into its base and write a checkpoint plain transformers loads, and with
    `gguf_types` ("f16", "q8_0") GGUF files of it too, each checked by loading it back, with an
    Ollama Modelfile beside each.

    The output is written to a staging folder and renamed at the end: a failure, a failed parity
    check or Ctrl-C leaves no output folder.

    Args:
        max_shard_size: the largest safetensors file written (`2GB`, `500MiB`, ...), and so the most of the
            output held in memory at once; none: DEFAULT_MAX_SHARD_SIZE.
        console: a rich Console for messages and progress; none: quiet.

    Returns:
        the parity report, also written to OUT/merge_report.json.

    Raises:
        UserError: not a run directory, damaged adapter, existing output, a GGUF export that cannot be done
            (refused before merging), not enough memory or disk, or a merge into the dequantized base whose KL
            from the trained model computed in float32 reaches its limit (`parity_limit`).
    """
    console = console or Console(quiet=True)
    say = console.print
    run_dir = Path(run_dir).resolve()
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run directory (it needs {RECIPE} and {ADAPTER}/)")
    out = Path(out).resolve() if out is not None else run_dir / MERGED
    check_out(out, overwrite)
    for leftover in remove_abandoned_staging(out):  # before the disk check: it frees what a killed merge held
        say(f"Removed {leftover}, left by a merge that was killed")
    try:
        max_shard_bytes = parse_bytes(max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    except UserError as error:
        raise UserError(f"--max-shard-size: {error}") from None
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    return_freed_memory()  # the host's peak is what decides whether a merge fits

    recipe = read_run_recipe(run_dir)
    base_path = adapter_base_model(run_dir)
    context = inference_context(recipe.quantization.compute_dtype)
    device = torch.device("cuda", context.local_rank) if context.device == "cuda" else torch.device("cpu")
    say(f"Merging {run_dir / ADAPTER} into {base_path} ({base} base, {dtype_name}, on {device.type}); "
        f"reading the run's first rows to check the merge on")
    files = base_checkpoint(base_path, recipe.model.revision, recipe.model.trust_remote_code)
    config = AutoConfig.from_pretrained(files.folder, trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
    if gguf_types:  # the merged checkpoint has the base's config and the run's tokenizer
        _, notes = check_exportable(config, tokenizer, gguf_types, out.name)
        for note in notes:
            say(f"GGUF: {note}")
    prompts, prompts_from = parity_prompts(run_dir, recipe, tokenizer)
    check_needs(files.folder, recipe, context, dtype=dtype, max_shard_bytes=max_shard_bytes,
                prompt_tokens=sum(map(len, prompts)), gguf_types=gguf_types, out=out, say=say)
    trained = trained_model(config, files, run_dir, recipe, context, device)
    base_config, config = config, merged_config(config, trained)
    for names in adapted_tied_weights(trained):
        say(f"The base model ties {' and '.join(names)}, which the adapter changes apart: the merged model holds "
            "them untied (tie_word_embeddings: false)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as staging:
        staging.mkdir()
        merger = LayerMerger(staging, trained, files, config, base=base, dtype=dtype, device=device,
                             max_shard_bytes=max_shard_bytes, trust_remote_code=recipe.model.trust_remote_code)
        say("Each layer is read from the base, quantized as in training, run on the parity prompts with the "
            "adapter, and merged")
        with Steps(console, "Merging", len(merger.of_layer), transient=True) as steps, quiet_8bit_matmuls():
            as_trained = streamed_logits(trained.model, trained.weights, prompts, device, merger.hooks(steps))
        shards = merger.writer.close()
        write_configs(staging, files.folder, config, dtype, merger.model, tokenizer)
        del trained, merger  # the adapter's weights: all the merge kept in memory
        if device.type == "cuda":
            torch.cuda.empty_cache()

        def trained_in(computed_in: torch.dtype) -> list[torch.Tensor]:
            return trained_logits(base_config, files, run_dir, recipe, context, device, computed_in, prompts, console)

        reference = as_trained if context.compute_dtype == REFERENCE_DTYPE else trained_in(REFERENCE_DTYPE)
        noise = {context.compute_dtype: compare_logits(reference, as_trained)}
        del as_trained
        if dtype not in noise and dtype != REFERENCE_DTYPE:  # a 16-bit checkpoint of a run trained in another dtype
            noise[dtype] = compare_logits(reference, trained_in(dtype))
        report = compare_logits(reference, merged_logits(staging, dtype, prompts, device, console,
                                                            recipe.model.trust_remote_code))
        limit = parity_limit(dtype, noise)
        enforced = base == "dequantized"
        result = {
            "qlora_version": __version__,
            "base": base,
            "dtype": dtype_name,
            "base_model": base_path,
            "adapter": str(run_dir / ADAPTER),
            "prompts": prompts_from,
            "tokens": report.tokens,
            "reference": f"the trained model (quantized base + adapter) computed in {dtype_label(REFERENCE_DTYPE)}",
            "max_abs_logit_diff": report.max_abs_logit_diff,
            "mean_kl_nats_per_token": report.mean_kl,
            **noise_entries(noise, context.compute_dtype),
            "kl_limit": limit if enforced else None,
            "kl_limit_rule": limit_rule(dtype, noise) if enforced else
                "none: a merge into the original weights departs from the trained model by the quantization error",
            "shards": shards,
        }
        if enforced and not report.mean_kl < limit:
            raise UserError(
                f"the merged model differs from the trained one: mean KL {report.mean_kl:.3g} nats/token "
                f"(limit {limit:.3g}: {limit_rule(dtype, noise)}); nothing was written"
            )
        if gguf_types:
            say(f"Writing GGUF ({', '.join(gguf_types)}): this loads the merged model whole")
            result["gguf"] = export_gguf_files(staging, gguf_types, prompts, name=out.name, say=say)
        result["seconds"] = round(time.perf_counter() - started, 2)
        (staging / MERGE_REPORT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result["out"] = str(out)
    return result
