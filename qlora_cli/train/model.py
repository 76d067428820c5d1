"""The model a run trains: the quantized base prepared for k-bit training with LoRA attached (or an earlier run's
adapter continued, with its frozen copy as the reference of the methods that have one), and whether its
activations are checkpointed. Loading the base itself is core/models.py's, shared with generation and merging.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from ..core import compat
from ..core.context import RunContext
from ..core.cpu import use_cheap_lora_dropout
from ..core.errors import Problem, UserError
from ..core.models import load_quantized_base
from ..core.recipe import LoraSection, Recipe
from ..core.rundir import ADAPTER, read_run_recipe
from ..plan.configs import read_model_config
from ..plan.memory import checkpointing_needed


def available_memory_bytes(device: str) -> int:
    """Memory a run can use: the GPU's total, or the RAM the operating system says is available."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def decide_checkpointing(recipe: Recipe, model_path: str, context: RunContext) -> tuple[bool, str]:
    """Whether to checkpoint activations, and why: as the recipe says, or for `auto` what the memory
    plan says for this device (on CPU the plan counts the chosen compute dtype and half the available RAM)."""
    setting = recipe.training.gradient_checkpointing
    if setting != "auto":
        return setting, "set in the recipe"
    memory = available_memory_bytes(context.device)
    planned = recipe
    if context.device == "cpu":
        planned = recipe.model_copy(deep=True)
        planned.quantization.compute_dtype = context.dtype_name
        memory //= 2  # leave room for the data, the tokenizer and the rest of the machine
    try:
        config = read_model_config(model_path)
    except UserError:
        return True, "auto: no model config to plan from, so on"
    needed = checkpointing_needed(config, planned, memory)
    return needed, f"auto: the memory plan {'needs' if needed else 'fits without'} it in {memory / 2**30:.1f} GiB"


def lora_config(lora: LoraSection) -> LoraConfig:
    """peft's LoraConfig for the recipe's `lora` section. LoftQ's start is set after the adapter is attached
    (core/loftq.py), so peft itself initialises such an adapter as usual."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=True if lora.init_lora_weights == "loftq" else lora.init_lora_weights,
        modules_to_save=lora.modules_to_save,
    )


def unmatched_modules_to_save(model, names: list[str]) -> list[str]:
    """The `lora.modules_to_save` names that matched no module of the model (peft ignores them silently)."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    return [name for name in names if not any(path == name or path.endswith("." + name) for path in wrapped)]


def load_model(model_path: str, recipe: Recipe, context: RunContext, checkpointing: bool, fresh: bool = True,
               say=None):
    """The base model, quantized as the recipe says, prepared for k-bit training, with LoRA attached.

    Args:
        fresh: the adapter starts here (not resumed from a checkpoint, which brings its own weights): LoftQ's
            start is computed.
        say: where the LoftQ start reports how much of the quantization error it takes back.
    """
    model = load_quantized_base(model_path, recipe.model, recipe.quantization, context)
    model.config.use_cache = False  # useless in training; it also hides packed-sequence boundaries
    if recipe.quantization.bits != 16:
        # Freezes the base and keeps its non-quantized weights in float32; checkpointing is enabled below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        # The non-reentrant variant: the reentrant one drops gradients when the checkpointed inputs need none.
        model.activation_checkpointing_enable({"use_reentrant": False})
    if recipe.model.adapter is not None:
        return continue_adapter(model, starting_adapter(recipe), recipe, context)
    lora = recipe.lora
    try:
        with compat.peft_reading_deprecated_flags():
            model = get_peft_model(model, lora_config(lora))
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None
    unmatched = unmatched_modules_to_save(model, lora.modules_to_save or [])
    if unmatched:
        raise UserError(f"lora.modules_to_save: no module of the model is named {', '.join(unmatched)}")
    if lora.init_lora_weights == "loftq" and fresh:
        from ..core.loftq import loftq_start
        from ..export.merge import base_checkpoint

        result = loftq_start(model, base_checkpoint(model_path, recipe.model.revision, recipe.model.trust_remote_code))
        if say is not None:
            say(f"LoftQ start on {result.layers} layers: quantization error ||W - Wq||_F {result.error_before:.4g} "
                f"-> {result.error_after:.4g} with the adapter")
    if context.device == "cpu":
        use_cheap_lora_dropout(model)
    return model


# The name of the frozen copy of a continued run's adapter, the reference of dpo and kto.
REFERENCE_ADAPTER = "reference"
METHODS_WITH_A_REFERENCE = ("dpo", "kto")


def starting_adapter(recipe: Recipe) -> Path:
    """The adapter folder `model.adapter` names (a run directory, or the adapter folder itself), after checking that
    it was trained on this recipe's base model.

    Raises:
        UserError: no adapter there, or one of a run on another base model.
    """
    given = Path(recipe.model.adapter)
    folder = given / ADAPTER if (given / ADAPTER).is_dir() else given
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"model.adapter: {given} is neither a run directory nor an adapter folder (no adapter_config.json)")
    run_dir = folder.parent
    if (run_dir / "recipe.yaml").is_file():
        earlier = read_run_recipe(run_dir)
        if earlier.model.base != recipe.model.base or earlier.quantization != recipe.quantization:
            raise UserError(
                f"model.adapter: {run_dir} was trained on {earlier.model.base} ({earlier.quantization.bits}-bit); this "
                f"recipe trains {recipe.model.base} ({recipe.quantization.bits}-bit). Use the same model.base and "
                "quantization as the run it continues"
            )
    return folder


def continue_adapter(model, folder: Path, recipe: Recipe, context: RunContext):
    """The base with an earlier run's adapter, trainable (named `default`, as a new one would be) and, for the methods
    that have a reference model, the same adapter again, frozen, as `reference`: no second copy of the base."""
    try:
        with compat.peft_reading_deprecated_flags():
            model = PeftModel.from_pretrained(model, folder, is_trainable=True)
            if recipe.training.method in METHODS_WITH_A_REFERENCE:
                model.load_adapter(folder, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    except Exception as exc:  # peft raises several types for a damaged adapter
        raise UserError(Problem(f"cannot load the adapter: {exc}", file=folder)) from None
    if context.device == "cpu":
        use_cheap_lora_dropout(model)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the parameters they pack."""
    trainable = total = 0
    for parameter in model.parameters():
        count = compat.weights_in(parameter)
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
