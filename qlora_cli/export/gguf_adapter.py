"""The adapter alone as a GGUF LoRA file for llama.cpp's `--lora` (and Ollama's ADAPTER), with base GGUF files it
applies to, and how far each base + adapter is from the model that was trained.

The LoRA file is written as llama.cpp's convert_lora_to_gguf.py writes one: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and for each adapted weight its GGUF name (gguf-py's map of the
architecture) + `.lora_a` ([r, in]) and `.lora_b` ([out, r]); llama.cpp adds alpha / r * B(A x). For llama.cpp's
LLAMA graph the query and key rows of B are permuted as the base's are.

The adapter learned against the 4-bit base, dequant(quant(W)), not W. So two base files are written: the base
dequantized from the 4-bit weights the adapter was trained with (`base-dequantized-<type>.gguf`), and the original
base (`base-original-<type>.gguf`, what a user may already have). Each is measured with the adapter applied
against the trained model (4-bit base + adapter) on the run's parity prompts: by llama.cpp itself where
llama-cpp-python is installed, else by transformers (the file's float16 weights + the adapter through peft). The
report names the closer one, and the Modelfile applies the adapter to it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..core.errors import Problem, UserError
from ..core.files import staged
from ..core.rundir import ADAPTER, RECIPE, adapter_base_model, is_run_dir, read_run_recipe
from ..core.context import inference_context
from .gguf import MergedModel, _permute, add_tensor, check_exportable, write_gguf
from .gguf_arch import Architecture, architecture_of
from .gguf_check import llama_cpp_available, llama_cpp_logits
from .modelfile import modelfile_for
from .parity import compare_logits, model_logits

ADAPTER_FILE = "adapter.gguf"
REPORT = "adapter_gguf_report.json"
BASES = ("dequantized", "original")


def adapter_settings(adapter_dir: Path) -> dict:
    """The adapter's adapter_config.json, refused where llama.cpp's LoRA cannot express it.

    Raises:
        UserError: not a LoRA, DoRA, per-module ranks or alphas, or whole modules saved beside the LoRA.
    """
    path = adapter_dir / "adapter_config.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(Problem(f"cannot read the adapter's settings: {error}", file=path)) from None
    reasons = {
        "peft_type": settings.get("peft_type") != "LORA" and f"a {settings.get('peft_type')} adapter, not a LoRA",
        "use_dora": settings.get("use_dora") and "DoRA's magnitude vectors have no place in a GGUF LoRA",
        "rank_pattern": settings.get("rank_pattern") and "ranks per module: a GGUF LoRA has one alpha",
        "alpha_pattern": settings.get("alpha_pattern") and "alphas per module: a GGUF LoRA has one alpha",
        "modules_to_save": settings.get("modules_to_save") and "whole modules trained beside the LoRA",
    }
    for key, reason in reasons.items():
        if reason:
            raise UserError(Problem(f"--gguf-adapter: {reason} ({key}); export a merged model with --gguf instead",
                                    file=path))
    return settings


def gguf_alpha(settings: dict) -> float:
    """The alpha llama.cpp scales by (alpha / r): the adapter's, or for rank-stabilised LoRA (alpha / sqrt(r)) the
    alpha that gives the same scale."""
    alpha = float(settings["lora_alpha"])
    return alpha * math.sqrt(settings["r"]) if settings.get("use_rslora") else alpha


def lora_tensors(adapter_dir: Path, config, architecture: Architecture) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of each LoRA matrix of the adapter, named and laid out as convert_lora_to_gguf.py
    writes them.

    Raises:
        UserError: a LoRA on a weight the base file does not hold (a tied output head) or gguf-py has no name for.
    """
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    path = adapter_dir / "adapter_model.safetensors"
    tensors = []
    with safe_open(str(path), framework="pt") as handle:
        for key in sorted(handle.keys()):
            part = ".lora_A.weight" if key.endswith(".lora_A.weight") else ".lora_B.weight" if key.endswith(
                ".lora_B.weight") else None
            if part is None:
                raise UserError(Problem(f"--gguf-adapter: {key} is not a LoRA matrix", file=path))
            hf_name = key.removeprefix("base_model.model.").removesuffix(part) + ".weight"
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                raise UserError("--gguf-adapter: the adapter changes the output head, which this base ties to the "
                                "embeddings: llama.cpp's base file holds no head of its own to apply it to")
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if name is None:
                raise UserError(Problem(f"--gguf-adapter: no GGUF name for {hf_name} of {architecture.name}", file=path))
            data = handle.get_tensor(key).float().numpy()
            if part == ".lora_B.weight" and architecture.permute_qk and hf_name.endswith("q_proj.weight"):
                data = _permute(data, heads)
            elif part == ".lora_B.weight" and architecture.permute_qk and hf_name.endswith("k_proj.weight"):
                data = _permute(data, kv_heads)
            tensors.append((name + (".lora_a" if part == ".lora_A.weight" else ".lora_b"), data))
    return tensors


def write_lora_gguf(adapter_dir: Path, config, target: Path, name: str) -> int:
    """Write the GGUF LoRA file of the adapter (float32 matrices: an adapter is small); returns how many weights
    it adapts."""
    settings = adapter_settings(adapter_dir)
    architecture = architecture_of(config)
    tensors = lora_tensors(adapter_dir, config, architecture)
    writer = gguf.GGUFWriter(str(target), architecture.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(settings))
    writer.add_name(name)
    for tensor_name, data in tensors:
        add_tensor(writer, tensor_name, data, "f32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tensors) // 2


def dequantize_base(model, trained, device) -> int:
    """Replace, in the float32 base `model`, every weight training quantized by the weights the 4-bit (or 8-bit)
    layers computed with (merge.dequantized_weight); returns how many."""
    from ..core import compat
    from .merge import dequantized_weight

    state = model.state_dict()
    replaced = 0
    for slot in trained.weights.slots:
        if compat.is_quantized_weight(slot.placeholder):
            module, attribute = slot.owners[0]
            weight = dequantized_weight(trained, slot, module, attribute, trained.weights.files, device, held=False)
            state[slot.name].copy_(weight.cpu())
            replaced += 1
    return replaced


def base_with_adapter_logits(model, adapter_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of the base `model` with its weights rounded to float16 (as the f16 file holds them) and the adapter
    applied by peft: what llama.cpp computes from the two files, without llama.cpp. Rounds `model` in place."""
    from peft import PeftModel

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    adapted = PeftModel.from_pretrained(model, adapter_dir).eval()
    try:
        return model_logits(adapted, prompts)
    finally:
        adapted.unload()


def adapter_modelfile(base_file: str, tokenizer, generation_config) -> str:
    """An Ollama Modelfile: FROM the base file, ADAPTER the LoRA file, and the chat template and stops of modelfile.py."""
    text, _ = modelfile_for(tokenizer, generation_config, base_file)
    first, rest = text.split("\n", 1)
    return f"{first}\nADAPTER ./{ADAPTER_FILE}\n{rest}"


def export_adapter_gguf(run_dir: Path, *, out: Path | None = None, out_type: str = "f16", overwrite: bool = False,
                        console=None) -> dict:
    """Write OUT (default RUN_DIR/gguf-adapter) with adapter.gguf, base-dequantized-<type>.gguf,
    base-original-<type>.gguf, a Modelfile applying the adapter to the closer base, and a report of each base +
    adapter against the trained model (mean KL, max |Δlogit| on the run's parity prompts).

    Raises:
        UserError: not a run directory, an existing OUT without `overwrite`, an adapter or model the GGUF export
            cannot write (refused before anything loads).
    """
    from rich.console import Console

    from .merge import base_checkpoint, parity_prompts, trained_model
    from .streaming import streamed_logits

    console = console or Console(quiet=True)
    say = console.print
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run directory (it needs {RECIPE} and {ADAPTER}/)")
    out = Path(out).resolve() if out is not None else run_dir / "gguf-adapter"
    if out.is_file():
        raise UserError(f"--out: {out} is a file, not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / REPORT).is_file()):
        raise UserError(f"{out} already exists" + ("; pass --overwrite to replace it" if (out / REPORT).is_file()
                                                   else " and is not an adapter export; choose another --out"))
    recipe = read_run_recipe(run_dir)
    adapter_dir = run_dir / ADAPTER
    files = base_checkpoint(adapter_base_model(run_dir), recipe.model.revision, recipe.model.trust_remote_code)
    config = AutoConfig.from_pretrained(files.folder, trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    _, notes = check_exportable(config, tokenizer, (out_type,), f"{out.name}-base")
    adapter_settings(adapter_dir)
    lora_tensors(adapter_dir, config, architecture_of(config))  # refused here, before the model loads
    for note in notes:
        say(f"GGUF: {note}")
    prompts, prompts_from = parity_prompts(run_dir, recipe, tokenizer)
    context = inference_context(recipe.quantization.compute_dtype)
    device = torch.device("cuda", context.local_rank) if context.device == "cuda" else torch.device("cpu")
    say("Running the trained model (4-bit base + adapter) on the parity prompts, a layer at a time")
    trained = trained_model(config, files, run_dir, recipe, context, device)
    reference = streamed_logits(trained.model, trained.weights, prompts, device)
    judge = "llama.cpp" if llama_cpp_available() else (
        "transformers (the base's weights rounded to float16" + ("" if out_type == "f16" else f", not to {out_type}")
        + ", + the adapter)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as staging:
        staging.mkdir()
        adapted = write_lora_gguf(adapter_dir, config, staging / ADAPTER_FILE, name=f"{out.name}-adapter")
        say(f"Wrote {ADAPTER_FILE}: LoRA on {adapted} weights")
        result = {"adapter": ADAPTER_FILE, "adapted_weights": adapted, "judge": judge, "prompts": prompts_from,
                  "bases": {}}
        for base in BASES:
            model = AutoModelForCausalLM.from_pretrained(files.folder, dtype=torch.float32,
                                                         trust_remote_code=recipe.model.trust_remote_code).eval()
            if base == "dequantized":
                dequantize_base(model, trained, device)
            file = staging / f"base-{base}-{out_type}.gguf"
            write_gguf(MergedModel(adapter_dir, model, tokenizer), file, out_type, name=f"{out.name}-base-{base}")
            if judge == "llama.cpp":
                logits = llama_cpp_logits(file, prompts, lora_file=staging / ADAPTER_FILE)
            else:
                logits = base_with_adapter_logits(model, adapter_dir, prompts)
            del model
            report = compare_logits(reference, logits)
            result["bases"][base] = {"file": file.name, "bytes": file.stat().st_size,
                                     "mean_kl_nats_per_token": report.mean_kl,
                                     "max_abs_logit_diff": report.max_abs_logit_diff, "tokens": report.tokens}
            say(f"Wrote {file.name}: with the adapter, mean KL {report.mean_kl:.3g} nats/token against the trained "
                f"model ({judge})")
        closer = min(BASES, key=lambda base: result["bases"][base]["mean_kl_nats_per_token"])
        result["closer_base"] = result["bases"][closer]["file"]
        try:
            generation_config = GenerationConfig.from_pretrained(files.folder)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        (staging / "Modelfile").write_text(adapter_modelfile(result["closer_base"], tokenizer, generation_config),
                                           encoding="utf-8")
        result["modelfile"] = "Modelfile"
        result["seconds"] = round(time.perf_counter() - started, 2)
        (staging / REPORT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result["out"] = str(out)
    return result
