"""Every use of a library's internals, in one place.

Each function below relies on something its library does not promise to keep: a private method, an
attribute set in a constructor, a logger's name. Each says which versions it was checked against and
guards what it relies on, so that a library upgrade that removes it fails here, loudly and by name,
instead of training something else silently. tests/test_compat.py exercises every one, except the
streaming merge's skeleton helpers (`quantize_skeleton`, `load_adapter_onto_skeleton`), which the merge
tests exercise by comparing the merge's logits with the trained model's.

Checked against: torch 2.13, transformers 5.23-5.24, peft 0.21.2, bitsandbytes 0.49-0.50.2, accelerate 1.15; the
floors in pyproject.toml are the first releases that have what is used here and in core/models.py and train/model.py.
"""

from __future__ import annotations

import inspect
import logging
import platform
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator


class LibraryChanged(RuntimeError):
    """An internal this project relies on is gone or changed: upgrade qlora, or pin the library."""


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that decide what is trained, for summaries and checkpoints."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("qlora-cli", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def require(condition: bool, what: str) -> None:
    if not condition:
        versions = ", ".join(f"{name} {version}" for name, version in library_versions().items())
        raise LibraryChanged(f"{what} ({versions}); qlora was checked against the versions in qlora_cli/core/compat.py")


# ---------------------------------------------------------------------------------------------
# torch

def cpu_has_native_bfloat16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): torch says so only through
    private helpers (`torch.cpu._is_avx512_bf16_supported`, `_is_amx_tile_supported`; torch 2.3-2.13)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    require(all(callable(check) for check in checks), "torch.cpu no longer has _is_avx512_bf16_supported/_is_amx_tile_supported")
    return any(check() for check in checks)


def profiler_memory_events(profiler) -> list:
    """The `[memory]` events (allocation positive, free negative) of a finished `torch.profiler.profile`
    run with `profile_memory=True`: they are public only through the private `kineto_results` (torch 2.13)."""
    results = getattr(getattr(profiler, "profiler", None), "kineto_results", None)
    require(results is not None and hasattr(results, "events"), "torch.profiler no longer exposes kineto_results.events()")
    return [event for event in results.events() if event.name() == "[memory]"]


def profiler_table(averages, keep: Callable[[object], bool], sort_by: str, row_limit: int) -> str:
    """The table `profiler.key_averages().table(...)` prints, of the averaged events `keep` accepts. torch offers
    no filter for it: the table is drawn by the `EventList` that `key_averages()` returns, a class of the
    non-public torch.autograd.profiler_util (torch 2.x, checked on 2.13), built here from the kept events."""
    from torch.autograd.profiler_util import EventList

    require(isinstance(averages, EventList) and callable(getattr(EventList, "table", None)),
            "torch.profiler's key_averages() is no longer a torch.autograd.profiler_util.EventList with table()")
    return EventList([event for event in averages if keep(event)]).table(sort_by=sort_by, row_limit=row_limit)


@contextmanager
def forwards_replaced(layers, make: Callable[[int], Callable]) -> Iterator[None]:
    """Within the block, each of `layers` (modules of a model) computes `make(index)(*args, **kwargs)` when the
    model calls it, instead of its own forward.

    The replacement is an instance attribute `forward`, removed after the block: it relies on torch's
    `Module.__call__` looking `forward` up on the instance (torch 2.x, checked on 2.13) and on the model calling
    each layer as a module (`layer(hidden_states, ...)`, as transformers' decoders do, 5.23-5.24, through
    `GradientCheckpointingLayer.__call__`). A block that ends normally must have run every replacement at least
    once: a model that reaches its layers some other way fails here, by name, instead of computing something else.
    """
    ran = [False] * len(layers)

    def marking(index: int) -> Callable:
        replacement = make(index)

        def forward(*args, **kwargs):
            ran[index] = True
            return replacement(*args, **kwargs)
        return forward

    for index, layer in enumerate(layers):
        layer.forward = marking(index)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
    skipped = [index for index, done in enumerate(ran) if not done]
    require(not skipped, f"the model did not call the forward of its layer(s) {skipped[:5]} as a module's forward")


# ---------------------------------------------------------------------------------------------
# typer

def show_flags_without_a_type() -> None:
    """In `--help`, a flag (`--overwrite`, `--help`) takes no value, so it gets no `<bool>` beside it. typer
    0.29 writes every option's type there, from `TyperOption.display_type_rich`, which returns the metavar
    when there is one: flags are given an empty one. Earlier typers write no type for flags and have no
    such method, so there is nothing to do; being cosmetic, this never stops the CLI, and a typer that
    shows `<bool>` again fails tests/test_recipe.py instead."""
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "flags_without_type", False):
        return

    def display_type_rich(self, ctx):
        return "" if self.is_flag and self.metavar is None else original(self, ctx)

    display_type_rich.flags_without_type = True
    TyperOption.display_type_rich = display_type_rich


# ---------------------------------------------------------------------------------------------
# transformers

def output_projection_is_sliceable(model) -> bool:
    """Whether the causal LM's forward narrows its hidden states with transformers' `slice_logits_to_keep`
    before the output projection, which takes a 2-D boolean `logits_to_keep` mask and returns the kept
    positions flattened (transformers >= 5.21, for the models whose modeling file calls it: Llama, Qwen2,
    Mistral, Gemma and most others). Models with remote code or their own slicing return False, and the
    Trainer's usual loss runs for them."""
    module = sys.modules.get(type(model).__module__)
    forward = inspect.signature(type(model).forward).parameters
    return module is not None and hasattr(module, "slice_logits_to_keep") and "logits_to_keep" in forward


@contextmanager
def output_projection_skipped(model, head) -> Iterator[None]:
    """Within this block the causal LM's output projection `head` is the identity, so its "logits" are
    the final hidden states of the positions `logits_to_keep` keeps. Relies on the model calling its
    head module by attribute (`self.lm_head(...)` in every transformers causal LM, 5.x)."""
    import torch

    name = next((name for name, child in model.named_children() if child is head), None)
    require(name is not None, f"{type(model).__name__}'s output projection is not one of its direct children")
    setattr(model, name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(model, name, head)


def attention_takes_a_custom_mask(model) -> bool:
    """Whether a 4-D attention mask passed to the causal LM's forward reaches its attention as it is, as the only
    mask: transformers 5.x's `masking_utils` returns a 4-D mask unchanged (`_preprocess_mask_arguments`, checked
    on 5.24), and the `sdpa` and `eager` attentions apply it (boolean for sdpa, additive for eager). Not where
    some layers attend through a sliding window, which such a mask would widen, nor for attentions that take no
    mask (flash-attention, paged)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    return all(kind == "full_attention" for kind in (getattr(config, "layer_types", None) or ()))


def custom_attention_mask(allowed, model):
    """`allowed` ([batch, query, key], True where the query may attend the key) as the 4-D mask the model's
    attention takes (see `attention_takes_a_custom_mask`)."""
    import torch

    allowed = allowed[:, None]
    if model.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(model.dtype).min)


def check_kept_hidden_states(hidden, expected_rows: int, hidden_size: int) -> None:
    """What `output_projection_skipped` and a boolean `logits_to_keep` must give: one row per kept position."""
    require(tuple(hidden.shape) == (expected_rows, hidden_size),
            f"a boolean logits_to_keep gave hidden states of shape {tuple(hidden.shape)}, not ({expected_rows}, {hidden_size})")


def save_remote_code(model, folder, config) -> None:
    """Copy the Python files of a model that runs its own code (`trust_remote_code`) into `folder`, and point
    `config.auto_map` at them, as `save_pretrained` does: through `custom_object_save(obj, folder, config=...)` of
    transformers.dynamic_module_utils, which transformers does not document (5.23-5.24)."""
    from transformers import dynamic_module_utils

    save = getattr(dynamic_module_utils, "custom_object_save", None)
    require(callable(save) and {"obj", "folder", "config"} <= set(inspect.signature(save).parameters),
            "transformers.dynamic_module_utils no longer has custom_object_save(obj, folder, config)")
    save(model, folder, config=config)


def quantize_skeleton(model, quantization_config, dtype) -> None:
    """Give a model built on the meta device the bitsandbytes layers `from_pretrained` would give it, in place.

    `from_pretrained` swaps the linear layers with its quantizer's `preprocess_model` before it loads any
    weight, and marks the model with `postprocess_model` afterwards (what peft reads to pick its 4-/8-bit LoRA
    layers). Both are methods of transformers' HfQuantizer interface, but the keyword arguments
    `from_pretrained` passes are not a promised API (transformers 5.23-5.24).
    """
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    takes = {kind for method in (quantizer.preprocess_model, quantizer.postprocess_model)
             for kind in (p.kind for p in inspect.signature(method).parameters.values())}
    require(inspect.Parameter.VAR_KEYWORD in takes,
            "transformers' quantizers no longer take preprocess_model(model, **kwargs) and postprocess_model(model, **kwargs)")
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None, use_kernels=False)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def quantize_like_transformers(value, placeholder, device):
    """A checkpoint tensor quantized into the bitsandbytes parameter `placeholder` stands for, bit for bit as
    `from_pretrained` quantizes it.

    transformers' loading ops (Bnb4bitQuantize, Bnb8bitQuantize in integrations/bitsandbytes.py, 5.23-5.24)
    build a Params4bit from the tensor already cast to the model's dtype and on its device, with the meta
    parameter's attributes, and quantize it by moving it to the device; an Int8Params is built on the CPU,
    without the meta parameter's row scales, and quantized by the move. tests/test_merge.py compares the result
    with a model `load_quantized_base` loaded.

    Args:
        value: the tensor, in the dtype the model computes in (the compute dtype for 4-bit weights).
        placeholder: the meta Params4bit or Int8Params of a model prepared by `quantize_skeleton`.
    """
    import bitsandbytes as bnb

    attributes = dict(placeholder.__dict__)
    if isinstance(placeholder, bnb.nn.Params4bit):
        require({"blocksize", "quant_type", "compress_statistics", "quant_storage"} <= set(attributes),
                "bitsandbytes' Params4bit no longer keeps blocksize/quant_type/compress_statistics/quant_storage")
        return bnb.nn.Params4bit(value.to(device), requires_grad=False, **attributes).to(device)
    require(isinstance(placeholder, bnb.nn.Int8Params) and "has_fp16_weights" in attributes,
            f"{type(placeholder).__name__} is not a bitsandbytes parameter this project knows how to quantize")
    attributes.pop("SCB", None)
    return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **attributes).to(device)


def cache_of(model, outputs) -> dict:
    """The keyword argument that hands a causal LM's key/value cache from one forward to the next: `cache` since
    transformers 5.24, `past_key_values` before (5.24 still takes it, with a warning, until 5.40)."""
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    value = getattr(outputs, name, None)
    require(value is not None, f"{type(model).__name__}'s outputs carry no `{name}`")
    return {name: value}


def _cache_keyword(model) -> str:
    """`cache` since transformers 5.24, `past_key_values` before; a peft model is asked about the model it wraps."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def batch_cache_arguments(model, layers: list, input_length: int = 1) -> dict:
    """The forward keyword arguments that give a causal LM the per-layer (keys, values) tensors of a batch
    ([rows, kv heads, length, head dim], empty for a prefill) as its cache, and ask for the last position's
    logits only (`logits_to_keep`, where the model takes it) of an input `input_length` tokens long.

    `DynamicCache(ddp_cache_data=...)` fills the cache from tensors; it is documented for DDP, and the
    per-layer `keys`/`values` that `cache_tensors` reads back are attributes, not API (transformers 5.23-5.24).
    Only full-attention layers are supported: a sliding-window layer would drop what the padding keeps aligned.
    The last position is named by an index tensor, not `logits_to_keep=1`: the int slices a non-contiguous
    view of the hidden states, and torch's matmul (2.13) then copies the whole transposed output embedding
    for it (71 of a 207 ms prefill of 46 tokens on SmolLM2-135M); an index gathers a contiguous copy.
    """
    import torch
    from transformers import DynamicCache

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    arguments = {_cache_keyword(model): DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()}
    if "logits_to_keep" in inspect.signature(type(inner).forward).parameters:
        device = next(model.parameters()).device
        arguments["logits_to_keep"] = torch.tensor([input_length - 1], device=device)
    return arguments


def cache_tensors(outputs) -> list:
    """The per-layer (keys, values) tensors of the cache a forward returned (see `batch_cache_arguments`)."""
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    require(cache is not None, "the model's outputs carry no cache (`cache` or `past_key_values`)")
    layers = getattr(cache, "layers", None)
    require(layers is not None, f"{type(cache).__name__} no longer keeps its layers in `.layers`")
    tensors = []
    for layer in layers:
        require(type(layer).__name__ == "DynamicLayer" and hasattr(layer, "keys") and hasattr(layer, "values"),
                f"batched serving needs full-attention cache layers with keys/values, got {type(layer).__name__}")
        tensors.append((layer.keys, layer.values))
    return tensors


def install_train_sampler(trainer, make_sampler: Callable) -> None:
    """Have the Trainer draw its training order from `make_sampler(train_dataset)`.

    transformers has no public hook for a custom training sampler; the Trainer asks its private
    `_get_train_sampler(train_dataset=None)` (transformers 5.x), overridden here on this one instance.
    """
    hook = getattr(type(trainer), "_get_train_sampler", None)
    require(hook is not None and "train_dataset" in inspect.signature(hook).parameters,
            "transformers.Trainer no longer has _get_train_sampler(train_dataset)")

    def get_train_sampler(train_dataset=None):
        return make_sampler(train_dataset if train_dataset is not None else trainer.train_dataset)

    trainer._get_train_sampler = get_train_sampler


def length_grouped_indices(lengths: list[int], batch_size: int, generator) -> list[int]:
    """transformers' length-grouped order: random megabatches of 50 batches, each sorted by length, the longest
    batch first (so that an out-of-memory shows at once). It lives in `transformers.trainer_pt_utils`, which is
    not public API (transformers 4.x-5.24)."""
    from transformers import trainer_pt_utils

    grouped = getattr(trainer_pt_utils, "get_length_grouped_indices", None)
    require(callable(grouped) and "generator" in inspect.signature(grouped).parameters,
            "transformers.trainer_pt_utils no longer has get_length_grouped_indices(..., generator=)")
    return grouped(lengths, batch_size, generator=generator)


def time_batch_fetching(trainer, begin_step: Callable[[int], None], phase: Callable[[], object]) -> None:
    """Around the Trainer fetching an optimizer step's micro-batches: `begin_step(step)` first, then the fetch
    within the context `phase()` (for `qlora train --profile`). The Trainer calls its `get_batch_samples`
    once per optimizer step, before that step's micro-batches train (transformers 5.x); it is not a documented
    hook, so it is wrapped on this one instance."""
    original = getattr(trainer, "get_batch_samples", None)
    require(callable(original) and list(inspect.signature(original).parameters)[:3] ==
            ["epoch_iterator", "num_batches", "device"],
            "transformers.Trainer no longer has get_batch_samples(epoch_iterator, num_batches, device)")

    def get_batch_samples(epoch_iterator, num_batches, device):
        begin_step(trainer.state.global_step + 1)
        with phase():
            return original(epoch_iterator, num_batches, device)

    trainer.get_batch_samples = get_batch_samples


def tensor_version(tensor) -> int:
    """The counter torch bumps at every in-place change of a tensor (`Tensor._version`, torch 1.x-2.13): a frozen
    weight whose counter is unchanged holds the same values, so a cast of it can be reused."""
    version = getattr(tensor, "_version", None)
    require(isinstance(version, int), "torch tensors no longer have an integer _version")
    return version


def trainer_loss_scale(trainer, num_items_in_batch) -> int:
    """The factor the Trainer applies to a model's own loss that was divided by a token count of all
    processes (`average_tokens_across_devices`), to undo the gradient averaging of data parallelism
    (Trainer.compute_loss in transformers 5.x). A loss computed outside the model must be scaled alike."""
    require(hasattr(trainer, "model_accepts_loss_kwargs"), "transformers.Trainer no longer has model_accepts_loss_kwargs")
    if trainer.args.average_tokens_across_devices and trainer.model_accepts_loss_kwargs and num_items_in_batch is not None:
        return trainer.accelerator.num_processes
    return 1


# ---------------------------------------------------------------------------------------------
# peft

@contextmanager
def peft_reading_deprecated_flags() -> Iterator[None]:
    """Around building a PeftModel (`get_peft_model`, `PeftModel.from_pretrained`, `PeftModel(...)`): peft (0.21)
    reads the model's `is_gradient_checkpointing`, which transformers (>= 5.23) has deprecated and warns about
    on every read. peft's call, which no user can change: only that warning, only within this block, is
    silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextmanager
def dora_magnitudes_left_to_load() -> Iterator[None]:
    """Around building a PeftModel of a DoRA adapter on a base on the meta device (the merge's skeleton): each
    DoRA layer gets an empty magnitude vector (meta, one value per output row), for the adapter file to fill.

    peft (0.21) starts a DoRA magnitude at the base weight's row norms (`DoraLinearLayer.update_layer`, called
    by the LoRA layer's DoRA variant when it is added), which needs the base's values; of a 4-bit base it first
    deep-copies the layer, which bitsandbytes refuses for a meta weight. The start is overwritten by the
    adapter's saved magnitude anyway. peft 0.21 appends "lora_magnitude_vector" to the layer's
    `adapter_layer_names`, so load_adapter_onto_skeleton gives it storage (tests/test_compat.py checks both).
    """
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    original = DoraLinearLayer.update_layer
    require("base_layer" in inspect.signature(original).parameters and "lora_B" in inspect.signature(original).parameters,
            "peft's DoraLinearLayer.update_layer no longer takes base_layer and lora_B")

    def empty_magnitude(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        self.weight = torch.nn.Parameter(torch.empty(lora_B.shape[0], device="meta"), requires_grad=False)

    DoraLinearLayer.update_layer = empty_magnitude
    try:
        yield
    finally:
        DoraLinearLayer.update_layer = original


def replace_lora_dropouts(model, replacement: Callable) -> int:
    """Put `replacement(dropout)` in place of every LoRA layer's input dropout for which it gives a module (None:
    keep it); returns how many were replaced.

    peft (0.3-0.21) keeps the dropouts in `LoraLayer.lora_dropout`, a ModuleDict per adapter, builds them as
    `nn.Dropout(p)` (or `nn.Identity` for p = 0), and its LoRA forward looks the module up there at every call
    (`self.lora_dropout[active_adapter](x)`), so the module put there is the one that runs (tests/test_compat.py
    checks that it does, in a forward).
    """
    import torch
    from peft.tuners.lora import LoraLayer

    replaced = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        dropouts = getattr(module, "lora_dropout", None)
        require(isinstance(dropouts, torch.nn.ModuleDict), "peft's LoraLayer.lora_dropout is no longer a ModuleDict")
        for name in list(dropouts.keys()):
            dropout = dropouts[name]
            require(isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)),
                    f"peft's LoRA dropout is a {type(dropout).__name__}, not torch.nn.Dropout or Identity")
            new = replacement(dropout)
            if new is not None:
                dropouts[name] = new
                replaced += 1
    return replaced


def load_adapter_onto_skeleton(model, adapter_dir, device) -> None:
    """Give a PeftModel whose base is on the meta device (built with `low_cpu_mem_usage=True`) real adapter
    weights on `device`, read from `adapter_dir`.

    peft's own loading moves every adapter weight to the device of the layer it adapts, which here is the meta
    device, where values are lost. So the adapter layers peft names in `adapter_layer_names` (peft 0.7-0.21) are
    given storage first, and the adapter is then copied in by `set_peft_model_state_dict`, which without
    `low_cpu_mem_usage` copies into existing tensors and moves nothing. So are the full copies of
    `modules_to_save` (peft's ModulesToSaveWrapper keeps them in its `modules_to_save` ModuleDict, 0.3-0.21),
    deep-copied from the meta base.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    import torch
    from peft.utils import ModulesToSaveWrapper, load_peft_weights, set_peft_model_state_dict

    adapter_layers = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names = getattr(module, "adapter_layer_names", None)
            require(isinstance(names, tuple), "peft's tuner layers no longer name their weights in adapter_layer_names")
            adapter_layers += [getattr(module, name) for name in names]
        elif isinstance(module, ModulesToSaveWrapper):
            require(isinstance(getattr(module, "modules_to_save", None), torch.nn.ModuleDict),
                    "peft's ModulesToSaveWrapper no longer keeps its copies in a modules_to_save ModuleDict")
            adapter_layers.append(module.modules_to_save)
    for layer in adapter_layers:
        layer.to_empty(device=device)
    result = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir), device=str(device)))
    # The tensors were given storage, not values: every one must have been loaded from the file.
    adapter_ids = {id(parameter) for layer in adapter_layers for parameter in layer.parameters()}
    missing = set(result.missing_keys)
    not_loaded = [name for name, parameter in model.named_parameters() if id(parameter) in adapter_ids and name in missing]
    require(not result.unexpected_keys and not not_loaded,
            f"peft did not load the adapter onto the model (unexpected {result.unexpected_keys[:3]}, not loaded {not_loaded[:3]})")


# ---------------------------------------------------------------------------------------------
# bitsandbytes

def is_4bit_weight(parameter) -> bool:
    """Whether `parameter` is a bitsandbytes 4-bit weight (Params4bit)."""
    import bitsandbytes as bnb

    return isinstance(parameter, bnb.nn.Params4bit)


def is_quantized_weight(parameter) -> bool:
    """Whether `parameter` is a bitsandbytes 4-bit (Params4bit) or 8-bit (Int8Params) weight."""
    import bitsandbytes as bnb

    return isinstance(parameter, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def weights_in(parameter) -> int:
    """How many weights `parameter` holds. A quantized Params4bit (`bnb_quantized`) packs two 4-bit weights into
    every byte of its storage, whose dtype is `quant_storage` (uint8 by default; the compute dtype under FSDP,
    bitsandbytes 0.43-0.50)."""
    if not is_4bit_weight(parameter):
        return parameter.numel()
    require(hasattr(parameter, "bnb_quantized"), "bitsandbytes' Params4bit no longer says whether it is packed (bnb_quantized)")
    return parameter.numel() * parameter.element_size() * 2 if parameter.bnb_quantized else parameter.numel()


def keep_4bit_training_kernels(model) -> None:
    """Make no-grad forwards compute as training does.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for inference on its first no-grad
    forward in eval mode, rounding the quantization constants to bfloat16 for good; training after that
    backpropagates through a kernel with no autograd support. Training (which evaluates between steps)
    and comparisons with the trained model (merge parity) must never see that repacking. Its switch is
    the instance attribute `Linear4bit.support_avx512bf16_for_cpu` (bitsandbytes 0.49-0.50).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            require(hasattr(module, "support_avx512bf16_for_cpu"),
                    "bitsandbytes' Linear4bit no longer has support_avx512bf16_for_cpu")
            module.support_avx512bf16_for_cpu = False


def dequantize_4bit_in_float32(weight):
    """The float32 weight a Linear4bit computes with when its compute dtype is float32: each 4-bit code's value
    times its block's scale, in float32.

    `bitsandbytes.functional.dequantize_4bit` returns the weight in its quant state's dtype, which is the dtype
    it was quantized from (bfloat16 for a run trained in bfloat16), rounding it; the layer's matmul (the
    `gemm_4bit` op, bitsandbytes 0.50, on CPU and CUDA) dequantizes into its input's dtype instead. So the
    quant state is copied with its dtype set to float32 (`QuantState.dtype`, bitsandbytes 0.50).
    """
    import copy

    import torch
    from bitsandbytes.functional import dequantize_4bit

    state = getattr(weight, "quant_state", None)
    require(state is not None and hasattr(state, "dtype"), "bitsandbytes' Params4bit no longer has quant_state.dtype")
    state = copy.copy(state)
    state.dtype = torch.float32
    return dequantize_4bit(weight.data, state)


def dequantize_8bit(weight, state=None):
    """The float32 weight an Int8Params holds: int8 x row scale / 127 (bitsandbytes' `int8_vectorwise_dequant`).

    The row scales are on the weight (`Int8Params.SCB`) until the first forward of its Linear8bitLt moves them
    to that layer's `state.SCB` (`init_8bit_state`, bitsandbytes 0.45-0.50); pass the layer's `state` then.
    """
    import bitsandbytes as bnb

    require(hasattr(weight, "SCB"), "bitsandbytes' Int8Params no longer keeps its row scales in SCB")
    scales = weight.SCB if weight.SCB is not None else getattr(state, "SCB", None)
    require(scales is not None, "a bitsandbytes 8-bit weight without row scales (neither weight.SCB nor state.SCB)")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def forget_quantization_state(module) -> None:
    """Drop what a bitsandbytes layer keeps of its weight outside the weight parameter, once that parameter is
    replaced: Linear4bit's `quant_state` (set by `Params4bit._quantize`) and Linear8bitLt's `state.CB`/`SCB`
    (set by its first forward) (bitsandbytes 0.45-0.50)."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        require(hasattr(module, "quant_state"), "bitsandbytes' Linear4bit no longer has quant_state")
        module.quant_state = None
    elif isinstance(module, bnb.nn.Linear8bitLt):
        require(hasattr(module.state, "CB") and hasattr(module.state, "SCB"),
                "bitsandbytes' Linear8bitLt.state no longer has CB/SCB")
        module.state.CB = module.state.SCB = None


# bitsandbytes tries to fetch an optional CPU kernel from a model hub at import time and logs a warning
# when it cannot, under this logger's name (bitsandbytes 0.50); the built-in kernels it falls back to are
# the ones tested here.
BITSANDBYTES_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_CPU_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def quiet_bitsandbytes_kernel_fetch() -> None:
    """Raise the level of the logger bitsandbytes reports the failed fetch on (`logging.getLogger(__name__)` of
    bitsandbytes/backends/cpu/ops.py, bitsandbytes 0.50). The message is logged while bitsandbytes is imported,
    on CPUs with AVX512-BF16 only, so this must run before anything imports bitsandbytes (peft does)."""
    logging.getLogger(BITSANDBYTES_CPU_KERNEL_LOGGER).setLevel(logging.ERROR)


# accelerate, starting a process group on CPUs with OMP_NUM_THREADS unset, sets torch's thread count to the
# physical cores over the processes on this machine and says so with this warning from accelerate/state.py,
# with its source line, in every process (accelerate 1.15). The thread count it sets is kept.
ACCELERATE_THREADS_MESSAGE = "OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at"


def quiet_accelerate_thread_notice() -> None:
    warnings.filterwarnings("ignore", message=re.escape(ACCELERATE_THREADS_MESSAGE), category=UserWarning)


def quiet_library_noise() -> None:
    """Silence the libraries' lines a user cannot act on: bitsandbytes' failed kernel fetch and accelerate's
    thread-count notice. Imports nothing but the standard library: qlora_cli/__init__.py calls it, before
    anything imports bitsandbytes or accelerate (and before `qlora --help`, which imports no torch)."""
    quiet_bitsandbytes_kernel_fetch()
    quiet_accelerate_thread_notice()


def transformers_bars_off() -> None:
    """No progress bars of transformers' own from now on (the "Loading weights" bar that `from_pretrained` draws
    in transformers 5.x, core_model_loading.py): qlora's own "Loading ..." line says what loads. The hub's
    download bars stay as they were: transformers' `disable_progress_bar` turns those off too (transformers
    5.23-5.24), so they are put back."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    hub_was_off = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not hub_was_off:
        hub_utils.enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# Chat templates (data/templates.py)

def _is_plain_conversation(conversation) -> bool:
    return bool(conversation) and all(
        type(message) is dict and all(type(key) is str and type(value) is str for key, value in message.items())
        for message in conversation)


def render_chat_template(tokenizer, template: str, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    """What `tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
    add_generation_prompt=...)` returns, at half the cost for conversations of plain string messages.

    The chat template's own rendering is a small part of that call: most of it converts each message, key and
    special token into plain data and back (transformers 5.24, `render_jinja_template`), which messages of
    strings do not need. The template is compiled by transformers' private `_compile_jinja_template` (its
    sandbox, filters and cache) and rendered with what `apply_chat_template` passes it: the messages, no tools
    or documents, the generation prompt flag and the special tokens map. Jinja's `Template.render` would merge
    the template's globals into each render's variables anew (half its time, for short conversations): they are
    merged once, and each context made from them with `new_context(..., shared=True)` (jinja2 3.1). The first
    conversation is rendered both ways, every call: if they differ, all are rendered by `apply_chat_template`.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        _compile_jinja_template = None
    if _compile_jinja_template is None or not all(_is_plain_conversation(c) for c in conversations):
        return list(tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt))
    compiled = _compile_jinja_template(template)
    variables = {**dict(compiled.globals), "tools": None, "documents": None,
                 "add_generation_prompt": add_generation_prompt, **tokenizer.special_tokens_map}
    concat, render = compiled.environment.concat, compiled.root_render_func
    rendered = [concat(render(compiled.new_context({**variables, "messages": conversation}, shared=True)))
                for conversation in conversations]
    expected = tokenizer.apply_chat_template(conversations[0], chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    if rendered[0] != expected:
        return list(tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt))
    return rendered


# ---------------------------------------------------------------------------------------------
# Preference tuning (train/methods/preference.py)

def loss_is_a_mean_per_micro_batch(trainer) -> None:
    """Tell the Trainer (transformers >= 5.19, checked on 5.24) that the loss `compute_loss` returns is a mean over
    its own micro-batch, not a sum divided by the whole accumulation step's token count: the Trainer then divides it
    by the gradient-accumulation steps itself. Without this, a model that accepts loss kwargs (every causal LM) makes
    the Trainer assume the loss is already scaled, and a preference loss would be summed over the micro-batches."""
    require(hasattr(type(trainer), "loss_is_scaled_for_ga"), "transformers.Trainer no longer has loss_is_scaled_for_ga")
    trainer.loss_is_scaled_for_ga = False


@contextmanager
def peft_adapter_switched(model, name: str, back: str) -> Iterator[None]:
    """Within the block, the PeftModel computes with its adapter `name` instead of `back`; then `back` is active and
    trainable again. peft's `set_adapter` (0.21, checked) makes the adapter it activates trainable unless
    `inference_mode=True`, and freezes the others: the reference is activated frozen, and switching back restores
    exactly the trained adapter's gradients."""
    require("inference_mode" in inspect.signature(model.set_adapter).parameters,
            "peft's PeftModel.set_adapter no longer takes inference_mode")
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(back)
