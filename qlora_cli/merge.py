"""Merging: a full-precision checkpoint that computes what the trained model (4-bit base + adapter) computed.

The adapter learned against dequant(quant(W)), not W. So by default the LoRA delta is added to the
dequantized 4-bit weights (`base: dequantized`); `base: original` adds it to the original weights, as
reloading the 16-bit base and calling peft's merge does, and the parity report says how far that drifts.
Nothing is ever merged into 4-bit weights and re-quantized.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .errors import UserError
from .parity import parity
from .models import load_run
from .rundir import MERGED, is_run_dir, read_run_recipe, staged

KL_LIMIT = 1e-3  # nats per token, for a float32 merge into the dequantized base
PARITY_PROMPTS = 4
PARITY_MAX_TOKENS = 128


def dense_weights(trained_model, base: str) -> dict[str, torch.Tensor]:
    """The float32 weight of every quantized linear layer after merging, by module name in the base model.

    Args:
        trained_model: the PeftModel on the 4-bit (or 8-bit) base, as trained.
        base: `dequantized` to merge into the weights the adapter was trained against, `original` to
            merge into the original checkpoint's weights (returned only for the adapted layers).
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import LoraLayer

    weights: dict[str, torch.Tensor] = {}
    inner = trained_model.base_model.model
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            delta = sum(module.get_delta_weight(adapter).float() for adapter in module.active_adapters)
            if base == "dequantized" and isinstance(layer, bnb.nn.Linear4bit):
                weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            elif base == "dequantized" and isinstance(layer, bnb.nn.Linear8bitLt):
                raise UserError("merging an 8-bit run is not supported yet; train with quantization.bits: 4 or 16")
            else:
                weight = None  # the original weight, filled in from the dense model
            weights[name] = (weight, delta)
        elif base == "dequantized" and isinstance(module, bnb.nn.Linear4bit) and not name.endswith("base_layer"):
            weights[name] = (dequantize_4bit(module.weight.data, module.weight.quant_state).float(), None)
    return weights


def build_merged(trained_model, base_path: str, base: str, dtype: torch.dtype, trust_remote_code: bool,
                 allow_pickle_weights: bool = False):
    """A dense model of the base architecture holding the merged weights, in `dtype`, on the CPU."""
    from transformers import AutoModelForCausalLM

    merged_weights = dense_weights(trained_model, base)
    # Load in float32 so that `original` merges add to unrounded weights; cast once at the end.
    dense = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.float32, device_map={"": "cpu"}, trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle_weights else True,
    )
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, (weight, delta) in merged_weights.items():
            target = modules[name].weight
            value = (weight if weight is not None else target.data.float()).to(target.device)
            if delta is not None:
                value = value + delta.to(target.device)
            target.data.copy_(value)
    return dense.to(dtype).eval()


def parity_prompts(run_dir: Path, tokenizer) -> tuple[list[list[int]], str]:
    """Token ids of the first evaluation rows of the run (else its first training rows), as the model
    saw them in training, and a description of where they came from."""
    from .data.sources import load_datasets
    from .data.tokenize import TokenizeOptions, tokenize_examples

    recipe = read_run_recipe(run_dir)
    try:
        datasets = load_datasets(recipe.data, recipe.training.seed)
    except UserError:
        raise UserError(f"{run_dir}: the run's data cannot be read any more, so there are no prompts to check the merge on") from None
    held_out = bool(datasets.eval)
    examples = (datasets.eval if held_out else datasets.train)[:PARITY_PROMPTS]
    options = TokenizeOptions(max_seq_len=PARITY_MAX_TOKENS, truncation="right")
    rows, _ = tokenize_examples(tokenizer, tokenizer.chat_template, examples, options)
    where = "evaluation rows" if held_out else "training rows (the run has no evaluation rows)"
    return [row["input_ids"] for row in rows], f"the first {len(rows)} {where}, at most {PARITY_MAX_TOKENS} tokens each"


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1:
        raise UserError(f"not enough free disk in {folder}: the merged model needs {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")


def merge_run(
    run_dir: Path,
    *,
    out: Path | None = None,
    dtype_name: str = "bfloat16",
    base: str = "dequantized",
    overwrite: bool = False,
    gguf_types: tuple[str, ...] = (),
    say=print,
) -> dict:
    """Merge a run's adapter into its base and write a checkpoint plain transformers loads, and with
    `gguf_types` ("f16", "q8_0") GGUF files of it too, each checked by loading it back, with an
    Ollama Modelfile beside each.

    The output is written to a staging folder and renamed at the end: a failure, a failed parity
    check or Ctrl-C leaves no output folder.

    Returns:
        the parity report, also written to OUT/merge_report.json.

    Raises:
        UserError: not a run directory, damaged adapter, existing output, no disk space, or a
            float32 dequantized merge whose KL exceeds KL_LIMIT.
    """
    run_dir = Path(run_dir).resolve()
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run directory (it needs recipe.yaml and adapter/)")
    out = Path(out).resolve() if out is not None else run_dir / MERGED
    if out.exists() and any(out.iterdir()):
        if not (out / "merge_report.json").is_file():
            raise UserError(f"--out: {out} is a non-empty folder that is not a merged model; choose another --out")
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out DIR")
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()

    loaded = load_run(run_dir)
    trained = loaded.model
    run_model = read_run_recipe(run_dir).model
    base_path = trained.peft_config["default"].base_model_name_or_path
    say(f"Merging {run_dir / 'adapter'} into {base_path} ({base} base, {dtype_name})")
    merged = build_merged(trained, base_path, base, dtype, run_model.trust_remote_code, run_model.allow_pickle_weights)
    prompts, prompts_from = parity_prompts(run_dir, loaded.tokenizer)
    report = parity(trained, merged, prompts)
    enforced = base == "dequantized" and dtype == torch.float32
    result = {
        "base": base,
        "dtype": dtype_name,
        "base_model": base_path,
        "adapter": str(run_dir / "adapter"),
        "prompts": prompts_from,
        "tokens": report.tokens,
        "max_abs_logit_diff": report.max_abs_logit_diff,
        "mean_kl_nats_per_token": report.mean_kl,
        "kl_limit": KL_LIMIT if enforced else None,
    }
    if enforced and not report.mean_kl < KL_LIMIT:
        raise UserError(
            f"the merged model differs from the trained one: mean KL {report.mean_kl:.3g} nats/token "
            f"(limit {KL_LIMIT}); nothing was written"
        )

    parameters = sum(p.numel() for p in merged.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out.parent, parameters * torch.finfo(dtype).bits // 8)
    with staged(out) as staging:
        merged.save_pretrained(staging, max_shard_size="2GB")
        loaded.tokenizer.save_pretrained(staging)
        if gguf_types:
            from .gguf_export import export_gguf_files

            result["gguf"] = export_gguf_files(staging, gguf_types, prompts, say=say)
        result["seconds"] = round(time.perf_counter() - started, 2)
        (staging / "merge_report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result["out"] = str(out)
    return result
