"""Merging on a tiny trained run: parity with the trained model, the same tensors as merging in memory,
shards that plain transformers loads, 8-bit runs, the memory check, atomicity."""

from __future__ import annotations

import gc
import importlib.metadata
import io
import json
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import train_tiny_run
from qlora_cli.cli import main
from qlora_cli.core.errors import UserError
from qlora_cli.export.merge import merge_run
from qlora_cli.core.models import load_run
from qlora_cli.core.recipe import load_recipe
from qlora_cli.train.run import run_training

PROMPT_IDS = [1, 40, 41, 42, 43, 44, 45]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def train_alpaca_run(folder: Path, tiny_model_dir: Path, old: str, new: str) -> Path:
    """The run directory of a tiny alpaca run (8 steps at a high rate) whose recipe has `old` replaced by `new`."""
    from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl

    write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    text = tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl"], max_steps=8, learning_rate=5e-3)
    (folder / "tiny.yaml").write_text(text.replace(old, new) + "output:\n  dir: run\n")
    run_training(load_recipe(folder / "tiny.yaml"), console=quiet())
    return folder / "run"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("merge")
    # Enough steps at a high rate that the adapter moves the logits well away from the base's.
    train_tiny_run(folder, tiny_model_dir, chat=True, max_steps=8, learning_rate=5e-3)
    return folder / "run"


@pytest.fixture(scope="module")
def bfloat16_run(tmp_path_factory, tiny_model_dir):
    """A tiny run trained in bfloat16, as `compute_dtype: auto` trains on GPUs and on CPUs with AVX512-BF16."""
    return train_alpaca_run(tmp_path_factory.mktemp("merge-bf16"), tiny_model_dir,
                            "compute_dtype: float32", "compute_dtype: bfloat16")


@pytest.fixture(scope="module")
def trained_8bit_run(tmp_path_factory, tiny_model_dir):
    return train_alpaca_run(tmp_path_factory.mktemp("merge8"), tiny_model_dir, "quantization:\n", "quantization:\n  bits: 8\n")


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Llama whose output head is its input embedding (Llama 3.2, Gemma, SmolLM2)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path_factory.mktemp("tied-model")
    shutil.copytree(tiny_model_dir, model_dir, dirs_exist_ok=True)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, tied_model_dir):
    folder = tmp_path_factory.mktemp("tied")
    train_tiny_run(folder, tied_model_dir, max_steps=4, learning_rate=5e-3)
    return folder / "run"


@pytest.fixture(scope="module")
def tied_head_run(tmp_path_factory, tied_model_dir):
    """A run on the tied tiny Llama with a LoRA on the output head too (lora.target_modules names lm_head)."""
    from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl

    folder = tmp_path_factory.mktemp("tied-head")
    write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    targets = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]"
    text = tiny_recipe_text(tied_model_dir, ["alpaca.jsonl"], max_steps=8, learning_rate=5e-3)
    (folder / "tiny.yaml").write_text(text.replace("lora:\n", f"lora:\n  target_modules: {targets}\n") + "output:\n  dir: run\n")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # peft's, about exactly this case
        run_training(load_recipe(folder / "tiny.yaml"), console=quiet())
    return folder / "run"


def run_on_edited_base(run_dir, folder, edit):
    """A copy of the run whose adapter names a copy of its base model, the copy's config.json changed by `edit`."""
    import shutil

    base, run = folder / "base", folder / "run"
    shutil.copytree(run_dir, run)
    config_path = run / "adapter" / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    shutil.copytree(adapter_config["base_model_name_or_path"], base)
    config = json.loads((base / "config.json").read_text())
    edit(config)
    (base / "config.json").write_text(json.dumps(config))
    config_path.write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(base)}))
    return run


def trained_logits(run_dir):
    loaded = load_run(run_dir)
    with torch.no_grad():
        return loaded.model(input_ids=torch.tensor([PROMPT_IDS], device=loaded.model.device)).logits.cpu(), loaded


def safetensors_of(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def in_memory_merge(run_dir, base: str, dtype: torch.dtype, folder):
    """The merge as it was before it streamed, kept here as the reference: the trained model loaded whole, a
    dense float32 copy of the base beside it, every merged layer copied into it, the copy cast and saved."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    loaded = load_run(run_dir)
    trained = loaded.model
    dense = AutoModelForCausalLM.from_pretrained(trained.peft_config["default"].base_model_name_or_path,
                                                 dtype=torch.float32)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, module in trained.base_model.model.named_modules():
            delta = None
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                delta = sum(module.get_delta_weight(adapter).float() for adapter in module.active_adapters)
            elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith("base_layer"):
                layer = module
            else:
                continue
            if base == "dequantized" and isinstance(layer, bnb.nn.Linear4bit):
                weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            else:
                weight = modules[name].weight.data.float()
            modules[name].weight.data.copy_(weight if delta is None else weight + delta)
    dense = dense.to(dtype).eval()
    dense.save_pretrained(folder)
    return trained, dense


def test_dequantized_float32_merge_matches_the_trained_model(trained_run, tmp_path):
    out = tmp_path / "merged"
    report = merge_run(trained_run, out=out, dtype_name="float32")
    assert report["mean_kl_nats_per_token"] < 1e-6
    assert report["max_abs_logit_diff"] < 1e-4
    written = json.loads((out / "merge_report.json").read_text())
    assert written["base"] == "dequantized" and written["qlora_version"] == importlib.metadata.version("qlora-cli")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected, loaded = trained_logits(trained_run)
    with torch.no_grad():
        got = merged(input_ids=torch.tensor([PROMPT_IDS])).logits
    assert (got - expected).abs().max().item() < 1e-4
    # The adapter really moved the model, so the check above is not trivially true.
    with loaded.model.disable_adapter(), torch.no_grad():
        base = loaded.model(input_ids=torch.tensor([PROMPT_IDS], device=loaded.model.device)).logits.cpu()
    assert (base - expected).abs().max().item() > 1e-2


def test_a_float32_merge_of_a_bfloat16_run_is_checked_against_the_trained_model_in_float32(bfloat16_run, tmp_path):
    """The merge reproduces the trained model computed in float32; the trained model computed in bfloat16, as it
    trained, is that plus bfloat16 rounding, which the report gives beside the merge's own difference."""
    from transformers import AutoModelForCausalLM

    from qlora_cli.export.merge import KL_LIMIT, parity_prompts
    from qlora_cli.export.parity import compare_logits, model_logits
    from qlora_cli.core.rundir import read_run_recipe

    out = tmp_path / "merged"
    report = merge_run(bfloat16_run, out=out, dtype_name="float32")
    assert report["trained_dtype"] == "bfloat16" and "float32" in report["reference"]
    assert report["mean_kl_nats_per_token"] < 1e-6 and report["kl_limit"] == KL_LIMIT
    noise = report["trained_dtype_noise_mean_kl_nats_per_token"]
    assert noise > 100 * max(report["mean_kl_nats_per_token"], 1e-10)
    # Measured from the merged checkpoint (which computes what the trained model does in float32), the run as
    # it loads (in bfloat16) is that noise away.
    loaded = load_run(bfloat16_run)
    prompts, _ = parity_prompts(bfloat16_run, read_run_recipe(bfloat16_run), loaded.tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    as_loaded = compare_logits(model_logits(merged, prompts), model_logits(loaded.model, prompts))
    assert as_loaded.mean_kl == pytest.approx(noise, rel=0.05)


def test_every_dtype_has_a_limit_from_its_rounding_noise(bfloat16_run, trained_run, tmp_path):
    from qlora_cli.export.merge import KL_LIMIT, ROUNDING_ALLOWANCE

    same = merge_run(bfloat16_run, out=tmp_path / "bf16-of-bf16", dtype_name="bfloat16")
    noise = same["trained_dtype_noise_mean_kl_nats_per_token"]
    assert noise > 0 and same["kl_limit"] == KL_LIMIT + ROUNDING_ALLOWANCE * noise
    assert same["mean_kl_nats_per_token"] < same["kl_limit"]
    # A run trained in float32 has no rounding of its own; a bfloat16 checkpoint of it is allowed bfloat16's.
    other = merge_run(trained_run, out=tmp_path / "bf16-of-f32", dtype_name="bfloat16")
    assert other["trained_dtype"] == "float32" and other["trained_dtype_noise_mean_kl_nats_per_token"] == 0
    rounding = other["bfloat16_noise_mean_kl_nats_per_token"]
    assert rounding > 0 and other["kl_limit"] == KL_LIMIT + ROUNDING_ALLOWANCE * rounding
    assert other["mean_kl_nats_per_token"] < other["kl_limit"]


def test_the_merge_is_checked_on_prompts_the_run_kept_without_its_data(trained_run, tmp_path):
    """The merge needs neither the data files nor their tokenization: the run kept the token ids it checks on."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    kept = json.loads((run / "parity_prompts.json").read_text())
    recipe = load_recipe(run / "recipe.yaml")
    moved = [source.path for source in recipe.data.train]
    assert moved and kept["prompts"] and all(len(ids) <= 128 for ids in kept["prompts"])
    for path in moved:  # as if the data had been moved away after training
        path.rename(path.with_name(path.name + ".moved"))
    try:
        report = merge_run(run, out=tmp_path / "merged", dtype_name="float32")
    finally:
        for path in moved:
            path.with_name(path.name + ".moved").rename(path)
    assert report["prompts"] == kept["from"]
    assert report["mean_kl_nats_per_token"] < 1e-6


def test_original_base_drifts_and_the_report_says_so(trained_run, tmp_path):
    exact = merge_run(trained_run, out=tmp_path / "a", dtype_name="float32")
    drift = merge_run(trained_run, out=tmp_path / "b", dtype_name="float32", base="original")
    assert drift["base"] == "original" and drift["kl_limit"] is None
    assert drift["mean_kl_nats_per_token"] > 100 * max(exact["mean_kl_nats_per_token"], 1e-9)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("base", ["dequantized", "original"])
def test_streamed_merge_writes_the_in_memory_merge_bit_for_bit(trained_run, tmp_path, base, dtype_name):
    from transformers import AutoModelForCausalLM

    from qlora_cli.export.merge import parity_prompts
    from qlora_cli.export.parity import compare_logits, model_logits
    from qlora_cli.core.rundir import read_run_recipe

    dtype = getattr(torch, dtype_name)
    report = merge_run(trained_run, out=tmp_path / "streamed", dtype_name=dtype_name, base=base)
    trained, dense = in_memory_merge(trained_run, base, dtype, tmp_path / "in-memory")
    streamed, in_memory = safetensors_of(tmp_path / "streamed"), safetensors_of(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys()
    for name, tensor in in_memory.items():
        assert streamed[name].dtype == dtype and torch.equal(streamed[name], tensor), name
    for file in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "streamed" / file).read_text()) == json.loads((tmp_path / "in-memory" / file).read_text())

    # The report is the parity of the trained model with the merged checkpoint as transformers loads it.
    prompts, _ = parity_prompts(trained_run, read_run_recipe(trained_run), load_run(trained_run).tokenizer)
    reference = model_logits(trained, prompts)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=dtype).eval()
    expected = compare_logits(reference, model_logits(loaded, prompts))
    assert (report["max_abs_logit_diff"], report["mean_kl_nats_per_token"]) == (expected.max_abs_logit_diff, expected.mean_kl)
    if dtype == torch.float32:  # the in-memory merge's own report, exactly
        before = compare_logits(reference, model_logits(dense, prompts))
        assert report["mean_kl_nats_per_token"] == before.mean_kl


def test_tied_embeddings_are_merged_once_and_stay_tied(tied_run, tmp_path):
    from transformers import AutoModelForCausalLM

    report = merge_run(tied_run, out=tmp_path / "streamed", dtype_name="float32")
    in_memory_merge(tied_run, "dequantized", torch.float32, tmp_path / "in-memory")
    streamed = safetensors_of(tmp_path / "streamed")
    assert "lm_head.weight" not in streamed and streamed.keys() == safetensors_of(tmp_path / "in-memory").keys()
    assert all(torch.equal(tensor, safetensors_of(tmp_path / "in-memory")[name]) for name, tensor in streamed.items())
    assert report["mean_kl_nats_per_token"] < 1e-6
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


@pytest.mark.parametrize("run", ["trained_run", "trained_8bit_run", "tied_run"])
def test_the_streamed_trained_model_computes_what_the_loaded_one_does(run, request):
    from transformers import AutoConfig

    from qlora_cli.core.context import inference_context
    from qlora_cli.export.merge import base_checkpoint, parity_prompts, trained_model
    from qlora_cli.export.parity import model_logits
    from qlora_cli.core.rundir import adapter_base_model, read_run_recipe
    from qlora_cli.export.streaming import streamed_logits

    run_dir = request.getfixturevalue(run)
    loaded = load_run(run_dir)
    recipe = read_run_recipe(run_dir)
    prompts, _ = parity_prompts(run_dir, recipe, loaded.tokenizer)
    files = base_checkpoint(adapter_base_model(run_dir), None)
    context = inference_context(recipe.quantization.compute_dtype)
    device = next(loaded.model.parameters()).device  # where load_run put it, as the merge does
    streamed = trained_model(AutoConfig.from_pretrained(files.folder), files, run_dir, recipe, context, device)
    assert all(p.device.type == "meta" for n, p in streamed.model.named_parameters() if "lora_" not in n)
    got = streamed_logits(streamed.model, streamed.weights, prompts, device)
    for expected, logits in zip(model_logits(loaded.model, prompts), got, strict=True):
        assert torch.equal(expected, logits)
    assert all(p.device.type == "meta" for n, p in streamed.model.named_parameters() if "lora_" not in n)


def test_a_small_max_shard_size_writes_shards_that_load(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    whole = merge_run(trained_run, out=tmp_path / "whole", dtype_name="float32")
    sharded = merge_run(trained_run, out=tmp_path / "sharded", dtype_name="float32", max_shard_size="40kB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert whole["shards"] == 1 and sharded["shards"] == len(files) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    for file in files:  # at most 40 kB of tensors, unless one tensor is larger on its own
        holds = [name for name, shard in index["weight_map"].items() if shard == file]
        assert len(holds) == 1 or (tmp_path / "sharded" / file).stat().st_size < 40_000 + 2048
    assert safetensors_of(tmp_path / "sharded").keys() == safetensors_of(tmp_path / "whole").keys()
    assert sharded["mean_kl_nats_per_token"] == whole["mean_kl_nats_per_token"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    expected, _ = trained_logits(trained_run)
    with torch.no_grad():
        assert (merged(input_ids=torch.tensor([PROMPT_IDS])).logits - expected).abs().max().item() < 1e-4


def test_an_8bit_run_merges(trained_8bit_run, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    report = merge_run(trained_8bit_run, out=out, dtype_name="float32")
    # The trained 8-bit layers quantize their inputs too (LLM.int8), the merged float32 ones do not.
    assert report["kl_limit"] == 1e-3 and report["mean_kl_nats_per_token"] < 1e-4
    loaded = load_run(trained_8bit_run)
    lora = loaded.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(lora.get_base_layer(), bnb.nn.Linear8bitLt)
    base = lora.get_base_layer()
    expected = bnb.functional.int8_vectorwise_dequant(base.weight.data, base.weight.SCB if base.weight.SCB is not None
                                                      else base.state.SCB) + lora.get_delta_weight("default")
    expected = expected.cpu()
    assert torch.equal(safetensors_of(out)["model.layers.0.self_attn.q_proj.weight"], expected)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected_logits, _ = trained_logits(trained_8bit_run)
    with torch.no_grad():
        assert (merged(input_ids=torch.tensor([PROMPT_IDS])).logits - expected_logits).abs().max().item() < 0.05


def test_a_merge_that_does_not_fit_is_refused_with_what_it_needs(trained_run, tmp_path, monkeypatch, capsys):
    import qlora_cli.export.merge as merge_module
    from qlora_cli.plan.sizes import format_bytes

    seen = {}
    real_check = merge_module.check_fits

    def check_fits(needs, **available):
        seen["needs"] = needs
        return real_check(needs, **available)

    monkeypatch.setattr(merge_module, "check_fits", check_fits)
    monkeypatch.setattr(merge_module, "available_host_memory", lambda: 100 * 2**20)
    with pytest.raises(SystemExit) as exited:
        main(["merge", str(trained_run), "--out", str(tmp_path / "m"), "--dtype", "float32"])
    err = " ".join(capsys.readouterr().err.split())
    needs = seen["needs"]
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"needs about {format_bytes(needs.host_bytes)} of memory" in err and "100 MiB of memory available" in err
    assert needs.host_bytes > 100 * 2**20 and needs.disk_bytes > 0
    assert not (tmp_path / "m").exists()

    monkeypatch.setattr(merge_module, "available_host_memory", lambda: 1 << 40)
    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 1000})())
    with pytest.raises(SystemExit) as exited:
        main(["merge", str(trained_run), "--out", str(tmp_path / "m")])
    err = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2 and f"{format_bytes(seen['needs'].disk_bytes)} of disk" in err and "of disk free in" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_merged_dir_loads_in_a_fresh_process_and_generates_like_the_adapter(trained_run, tmp_path):
    out = tmp_path / "merged"
    merge_run(trained_run, out=out, dtype_name="float32")
    _, loaded = trained_logits(trained_run)
    with torch.no_grad():
        expected = loaded.model.generate(
            input_ids=torch.tensor([PROMPT_IDS]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0].tolist()
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
AutoTokenizer.from_pretrained({str(out)!r})
with torch.no_grad():
    ids = model.generate(input_ids=torch.tensor([{PROMPT_IDS}]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
print(json.dumps(ids[0].tolist()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_interrupted_merge_leaves_no_output(trained_run, tmp_path, monkeypatch):
    import qlora_cli.export.merge as merge_module

    real_save = merge_module.save_file
    written = []

    def interrupted_at_the_second_shard(tensors, filename, metadata=None):
        if written:
            raise KeyboardInterrupt
        written.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(merge_module, "save_file", interrupted_at_the_second_shard)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        merge_run(trained_run, out=out, dtype_name="float32", max_shard_size="40kB")
    assert len(written) == 1 and list(tmp_path.iterdir()) == []


def test_failed_parity_writes_nothing(trained_run, tmp_path, monkeypatch):
    import qlora_cli.export.merge as merge_module

    monkeypatch.setattr(merge_module, "KL_LIMIT", 0.0)
    with pytest.raises(Exception) as caught:
        merge_run(trained_run, out=tmp_path / "merged", dtype_name="float32")
    assert "nothing was written" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_adapter_is_exit_2(trained_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(trained_run, broken)
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(SystemExit) as exited:
        main(["merge", str(broken), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "adapter" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()

    shutil.rmtree(broken / "adapter")
    with pytest.raises(SystemExit) as exited:
        main(["merge", str(broken)])
    assert exited.value.code == 2 and "not a run directory" in capsys.readouterr().err


def test_existing_output_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "merge_report.json").write_text("{}")
    with pytest.raises(SystemExit) as exited:
        main(["merge", str(trained_run), "--out", str(out)])
    assert exited.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "merge_report.json").read_text() == "{}"


def test_overwrite_never_deletes_a_folder_that_is_not_a_merge(trained_run, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(SystemExit) as exited:
        main(["merge", str(trained_run), "--out", str(out), "--overwrite"])
    assert exited.value.code == 2 and "not a merged model" in capsys.readouterr().err
    assert (out / "keep").read_text() == "x"


def test_output_merge_frees_the_trained_model_then_merges(tmp_path, tiny_model_dir, monkeypatch):
    import qlora_cli.train.loss as loss
    import qlora_cli.train.run as train_module
    from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl

    trained = {}
    real_fit, real_merge = train_module.fit, train_module.merge_run

    def fit(run, *args, **kwargs):
        trained["model"] = weakref.ref(run.model)
        return real_fit(run, *args, **kwargs)

    def merge_run_checking(*args, **kwargs):
        gc.collect()
        trained["alive when merging"] = trained["model"]() is not None
        trained["cast head cached when merging"] = bool(loss._cast_cache)
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit", fit)
    monkeypatch.setattr(train_module, "merge_run", merge_run_checking)
    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl"], max_steps=2) + "output:\n  dir: run\n  merge: true\n")
    frozen_head = torch.zeros(8, 4)
    loss.cast_weight(frozen_head, torch.bfloat16)  # what a bfloat16 run's loss caches: a cast copy of the frozen head
    summary = run_training(load_recipe(path), console=quiet()).summary
    assert trained["alive when merging"] is False and trained["cast head cached when merging"] is False
    report = json.loads((tmp_path / "run" / "merged" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["base"] == "dequantized"
    assert summary["merged"]["out"] == str(tmp_path / "run" / "merged")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["merged"] == summary["merged"]


def test_gguf_export_loads_back_with_the_same_logits_and_tokens(trained_run, tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    report = merge_run(trained_run, out=out, dtype_name="float32", gguf_types=("f16", "q8_0"))
    f16, q8 = report["gguf"]["f16"], report["gguf"]["q8_0"]
    assert (out / "model-f16.gguf").is_file() and (out / "model-q8_0.gguf").is_file()
    assert f16["mean_kl_nats_per_token"] < 1e-4 and f16["max_abs_logit_diff"] < 0.05
    assert q8["bytes"] < f16["bytes"] and q8["mean_kl_nats_per_token"] < 1e-2
    reloaded = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    text = "<s><|user|>\nWhat is the capital of France?</s>"
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert json.loads((out / "merge_report.json").read_text())["gguf"]["f16"]["file"] == "model-f16.gguf"
    import gguf

    for out_type in ("f16", "q8_0"):  # named as llama.cpp's converter names it: after the model's folder
        assert gguf.GGUFReader(str(out / f"model-{out_type}.gguf")).fields["general.name"].contents() == "merged"
    # An Ollama Modelfile beside each file, and llama.cpp's tokenizer consulted where it is installed.
    for out_type in ("f16", "q8_0"):
        modelfile = (out / f"model-{out_type}.Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./model-{out_type}.gguf\nTEMPLATE") and report["gguf"][out_type]["modelfile"]["template"]
        check = report["gguf"][out_type]["llama_cpp"]
        if check["checked"]:
            assert check["identical"] == check["lines"], check["mismatches"]
        else:
            assert "pip install llama-cpp-python" in check["reason"]


def test_progress_says_which_layer_off_a_terminal(trained_run, tmp_path):
    console = quiet()
    merge_run(trained_run, out=tmp_path / "merged", dtype_name="float32", console=console)
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("Merging ") and any(line.startswith("The merge needs about") for line in lines)
    assert "Merging: layer 1 of 2" in lines and "Merging: layer 2 of 2" in lines
    assert lines.count("Merging: layer 1 of 2") == 1  # a line when the layer changes, not per tensor
    assert "Merged checkpoint read back on the parity prompts: layer 2 of 2" in lines


def test_a_model_the_planner_does_not_know_merges_without_an_estimate(trained_run, tmp_path):
    # A config the memory planner refuses (it counts no experts) is still a model transformers builds and merges.
    run = run_on_edited_base(trained_run, tmp_path, lambda config: config.update(num_local_experts=4))
    console = quiet()
    report = merge_run(run, out=tmp_path / "merged", dtype_name="float32", console=console)
    output = " ".join(console.file.getvalue().split())
    assert "No memory estimate for this model" in output and "mixture-of-experts" in output
    assert report["mean_kl_nats_per_token"] < 1e-6


@pytest.mark.parametrize("where", ["out", "parent"])
def test_an_out_that_is_a_file_is_refused(trained_run, tmp_path, capsys, where):
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    out = file if where == "out" else file / "merged"
    with pytest.raises(SystemExit) as exited:
        main(["merge", str(trained_run), "--out", str(out), "--overwrite"])
    err = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"--out: {file} is a file, not a folder" in err
    assert file.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_lora_on_a_tied_output_head_is_merged_into_an_untied_head(tied_head_run, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = load_run(tied_head_run)
    head = loaded.model.base_model.model.lm_head
    delta = head.get_delta_weight("default").float()
    base_embedding = head.get_base_layer().weight.detach().float().cpu().clone()
    assert delta.abs().max().item() > 1e-3  # the head's adapter learned something to lose

    out, console = tmp_path / "merged", quiet()
    report = merge_run(tied_head_run, out=out, dtype_name="float32", console=console)
    assert report["mean_kl_nats_per_token"] < 1e-6
    assert "ties model.embed_tokens.weight and lm_head.weight" in " ".join(console.file.getvalue().split())
    tensors = safetensors_of(out)
    # The embedding stays the base's; the head gets its own weight with the delta: one tensor cannot hold both.
    assert torch.equal(tensors["model.embed_tokens.weight"], base_embedding)
    assert torch.equal(tensors["lm_head.weight"], base_embedding + delta.cpu())
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    expected, _ = trained_logits(tied_head_run)
    with torch.no_grad():
        assert (merged(input_ids=torch.tensor([PROMPT_IDS])).logits - expected).abs().max().item() < 1e-4


def test_a_tied_weight_that_cannot_be_untied_is_refused_before_merging(tied_head_run, tmp_path, monkeypatch):
    import qlora_cli.export.merge as merge_module

    # As for a model whose weights stay tied whatever its config says.
    monkeypatch.setattr(merge_module, "merged_config", lambda config, trained: config)
    with pytest.raises(UserError, match="changes model.embed_tokens.weight and lm_head.weight, which this model ties"):
        merge_run(tied_head_run, out=tmp_path / "merged", dtype_name="float32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sharded, remote_code", [(True, False), (False, False), (True, True)])
def test_a_hub_base_downloads_only_the_weights_its_index_names(tiny_model_dir, tmp_path, monkeypatch, sharded, remote_code):
    import shutil

    from huggingface_hub.utils import filter_repo_objects
    from transformers import AutoModelForCausalLM

    import qlora_cli.export.merge as merge_module

    # A hub repository as Mistral-7B-Instruct-v0.3's: transformers' weights, and a consolidated copy beside them.
    repo = tmp_path / "repo"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(repo, max_shard_size="100KB" if sharded else "1GB")
    shards = sorted(p.name for p in repo.glob("*.safetensors"))
    assert (len(shards) > 1) == sharded
    shutil.copy(repo / shards[0], repo / "consolidated.safetensors")
    (repo / "params.json").write_text("{}")
    (repo / "modeling_custom.py").write_text("")  # fetched only for a model trusted to run its own code
    cache = tmp_path / "cache"

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        # What huggingface_hub fetches for these patterns, into one snapshot folder.
        assert repo_id == "org/model" and revision == "main" and not kwargs
        names = [p.name for p in repo.iterdir()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            cache.mkdir(exist_ok=True)
            shutil.copy(repo / name, cache / name)
        return str(cache)

    monkeypatch.setattr(merge_module, "snapshot_download", snapshot_download)
    files = merge_module.base_checkpoint("org/model", "main", trust_remote_code=remote_code)
    assert files.folder == cache and sorted(p.name for p in cache.glob("*.safetensors")) == shards
    assert (cache / "params.json").is_file() and (cache / "modeling_custom.py").is_file() == remote_code
    assert all(name in files for name in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())


# A model defined by its own code, as hub models loaded with trust_remote_code are: a Llama under another name.
REMOTE_CONFIGURATION = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tinyremote"
'''
REMOTE_MODELING = '''from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


@pytest.fixture(scope="module")
def remote_code_run(tmp_path_factory, tiny_model_dir):
    """A run (model.trust_remote_code: true) on a copy of the tiny Llama that names its own code in auto_map.
    transformers copies such code into a modules cache: the module's own while its tests run, not the user's."""
    import shutil

    import transformers.dynamic_module_utils as dynamic

    from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl

    folder = tmp_path_factory.mktemp("remote")
    model_dir = folder / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "configuration_tinyremote.py").write_text(REMOTE_CONFIGURATION)
    (model_dir / "modeling_tinyremote.py").write_text(REMOTE_MODELING)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"})
    (model_dir / "config.json").write_text(json.dumps(config))
    write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    text = tiny_recipe_text(model_dir, ["alpaca.jsonl"], max_steps=4, learning_rate=5e-3)
    (folder / "tiny.yaml").write_text(text.replace("model:\n", "model:\n  trust_remote_code: true\n") + "output:\n  dir: run\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("modules")))
        run_training(load_recipe(folder / "tiny.yaml"), console=quiet())
        yield folder / "run"


def test_a_model_with_its_own_code_merges_and_loads(remote_code_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    report = merge_run(remote_code_run, out=out, dtype_name="float32")
    assert report["mean_kl_nats_per_token"] < 1e-6
    # The code travels with the checkpoint, as save_pretrained writes it.
    assert (out / "modeling_tinyremote.py").is_file() and (out / "configuration_tinyremote.py").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    assert type(merged).__name__ == "TinyRemoteForCausalLM"
    expected, _ = trained_logits(remote_code_run)
    with torch.no_grad():
        assert (merged(input_ids=torch.tensor([PROMPT_IDS])).logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda config: config.update(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
     "RoPE scaling 'dynamic' is not supported"),
    (lambda config: config.update(model_type="gemma", architectures=["GemmaForCausalLM"]),
     "gemma with the 'silu' activation: llama.cpp computes 'gelu_pytorch_tanh'"),
], ids=["rope", "architecture"])
def test_a_gguf_export_that_cannot_be_done_is_refused_before_merging(trained_run, tmp_path, monkeypatch, edit, message):
    import qlora_cli.export.merge as merge_module

    run = run_on_edited_base(trained_run, tmp_path / "edited", edit)

    def trained_model(*args, **kwargs):
        raise AssertionError("the merge started")

    monkeypatch.setattr(merge_module, "trained_model", trained_model)
    with pytest.raises(UserError, match=message):
        merge_run(run, out=tmp_path / "merged", dtype_name="float32", gguf_types=("f16",))
    assert not (tmp_path / "merged").exists()


def test_a_merge_with_gguf_files_loads_the_merged_model_and_tokenizer_once(trained_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qlora_cli.export.merge as merge_module

    loads = {"model": 0, "gguf": 0, "tokenizer": 0, "recipe": 0}
    real_model, real_tokenizer, real_recipe = (AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained,
                                               merge_module.read_run_recipe)

    def load_model(*args, **kwargs):
        loads["gguf" if "gguf_file" in kwargs else "model"] += 1
        return real_model(*args, **kwargs)

    def load_tokenizer(*args, **kwargs):
        loads["tokenizer"] += 1
        return real_tokenizer(*args, **kwargs)

    def read_recipe(*args, **kwargs):
        loads["recipe"] += 1
        return real_recipe(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", load_tokenizer)
    monkeypatch.setattr(merge_module, "read_run_recipe", read_recipe)
    report = merge_run(trained_run, out=tmp_path / "merged", dtype_name="float32", gguf_types=("f16", "q8_0"))
    assert set(report["gguf"]) == {"f16", "q8_0"}
    # The run's tokenizer, the merged folder's; the merged model whole once, and each file loaded back once by
    # transformers where llama.cpp is not installed to compute the files' logits.
    from qlora_cli.export.gguf_check import llama_cpp_available

    assert loads == {"model": 1, "gguf": 0 if llama_cpp_available() else 2, "tokenizer": 2, "recipe": 1}
