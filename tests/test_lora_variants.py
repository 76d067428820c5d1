"""LoRA variants as peft names them (lora.use_dora, use_rslora, init_lora_weights, modules_to_save): refused
before loading where they cannot work, counted by the memory plan, and, on the tiny model, trained, resumed
exactly and merged with the parity report passing."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl
from qlora_cli.core.errors import UserError
from qlora_cli.core.loftq import low_rank_split
from qlora_cli.core.recipe import load_recipe

VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "loftq": {"init_lora_weights": "loftq"},
    "gaussian": {"init_lora_weights": "gaussian"},
    "modules_to_save": {"modules_to_save": ["lm_head", "embed_tokens"]},
}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def write_recipe(folder, model_dir, lora: dict, bits: int = 4, **training):
    write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    text = tiny_recipe_text(model_dir, ["alpaca.jsonl"], **{"max_steps": 6, "learning_rate": 5e-3, **training})
    keys = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in lora.items())
    text = text.replace("lora:\n", "lora:\n" + keys).replace("quantization:\n", f"quantization:\n  bits: {bits}\n")
    path = folder / "tiny.yaml"
    path.write_text(text + "output:\n  dir: run\n")
    return path


# ---------------------------------------------------------------------------------------------
# Refused before anything loads

@pytest.mark.parametrize("value, words", [
    ("pissa", "PiSSA"), ("pissa_niter_4", "PiSSA"), ("olora", "OLoRA"), ("eva", "EVA"), ("corda", "CorDA"),
    ("mica", "MiCA"), (False, "debugging"), ("kaiming", "unknown initialisation"),
])
def test_unsupported_initialisations_are_refused_with_the_line(tmp_path, tiny_model_dir, value, words):
    path = write_recipe(tmp_path, tiny_model_dir, {"init_lora_weights": value})
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    text = caught.value.render()
    assert words in text and "lora.init_lora_weights" in text and f"{path}:" in text


def test_loftq_needs_a_4bit_base_and_orthogonal_an_unquantized_one(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="loftq starts the adapter from the error of 4-bit"):
        load_recipe(write_recipe(tmp_path, tiny_model_dir, {"init_lora_weights": "loftq"}, bits=8))
    with pytest.raises(UserError, match="orthogonal needs an unquantized base"):
        load_recipe(write_recipe(tmp_path, tiny_model_dir, {"init_lora_weights": "orthogonal"}, bits=4))
    with pytest.raises(UserError, match="even r"):
        load_recipe(write_recipe(tmp_path, tiny_model_dir, {"init_lora_weights": "orthogonal"}, bits=16),
                    ["lora.r=7"])
    assert load_recipe(write_recipe(tmp_path, tiny_model_dir, {"init_lora_weights": "orthogonal"}, bits=16))


def test_cli_refuses_a_variant_with_exit_2_before_loading(tmp_path, tiny_model_dir, capsys):
    from qlora_cli.cli import main

    path = write_recipe(tmp_path, tiny_model_dir, {"init_lora_weights": "pissa"})
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path)])
    assert exit_.value.code == 2
    assert "PiSSA" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_unknown_module_to_save_is_refused(tmp_path, tiny_model_dir):
    from qlora_cli.train.run import run_training

    path = write_recipe(tmp_path, tiny_model_dir, {"modules_to_save": ["lm_hed"]})
    with pytest.raises(UserError, match="no module of the model is named lm_hed"):
        run_training(load_recipe(path), console=quiet())
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The plan counts them, as the loaded model has them

@pytest.mark.parametrize("name", ["dora", "modules_to_save"])
def test_plan_counts_what_the_loaded_model_trains(tmp_path, tiny_model_dir, name):
    from qlora_cli.core.context import inference_context
    from qlora_cli.train.model import count_parameters, load_model
    from qlora_cli.plan.configs import read_model_config
    from qlora_cli.plan.memory import plan_memory

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, VARIANTS[name]))
    plain = load_recipe(write_recipe(tmp_path, tiny_model_dir, {}))
    config = read_model_config(str(tiny_model_dir))
    plan, plain_plan = plan_memory(config, recipe), plan_memory(config, plain)
    model = load_model(str(tiny_model_dir), recipe, inference_context("float32"), checkpointing=False)
    trainable, _ = count_parameters(model)
    assert plan.lora_parameters == trainable > plain_plan.lora_parameters
    # float32 weights, gradients and two AdamW states for each extra parameter
    extra = plan.lora_parameters - plain_plan.lora_parameters
    assert plan.optimizer_bytes - plain_plan.optimizer_bytes == 8 * extra
    assert plan.lora_bytes - plain_plan.lora_bytes == plan.gradient_bytes - plain_plan.gradient_bytes == 4 * extra


def test_plan_refuses_a_module_to_save_it_cannot_size(tmp_path, tiny_model_dir):
    from qlora_cli.plan.configs import read_model_config
    from qlora_cli.plan.memory import plan_memory

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, {"modules_to_save": ["score"]}))
    with pytest.raises(UserError, match="cannot size the module 'score'"):
        plan_memory(read_model_config(str(tiny_model_dir)), recipe)


# ---------------------------------------------------------------------------------------------
# LoftQ's start

def test_low_rank_split_gives_the_best_rank_r_approximation_scaled():
    torch.manual_seed(0)
    exact = torch.randn(12, 3) @ torch.randn(3, 20)  # rank 3
    a, b = low_rank_split(exact, 3, scaling=0.5)
    assert a.shape == (3, 20) and b.shape == (12, 3)
    assert torch.allclose(0.5 * b @ a, exact, atol=1e-4)
    noisy = exact + 0.01 * torch.randn(12, 20)
    a, b = low_rank_split(noisy, 3, scaling=2.0)
    assert (noisy - 2.0 * b @ a).norm() < 0.05 * noisy.norm()


def test_loftq_start_takes_back_part_of_the_quantization_error(tmp_path, tiny_model_dir):
    from qlora_cli.core.context import inference_context
    from qlora_cli.train.model import load_model

    said = []
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, VARIANTS["loftq"]))
    load_model(str(tiny_model_dir), recipe, inference_context("float32"), checkpointing=False, say=said.append)
    (line,) = said
    before, after = (float(x) for x in line.split("||_F ")[1].split(" with")[0].split(" -> "))
    assert "14 layers" in line and 0 < after < before


# ---------------------------------------------------------------------------------------------
# Train, resume exactly, merge with parity

def metrics(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_resumes_exactly_and_merges_with_parity(tmp_path, tiny_model_dir, name):
    from transformers import AutoModelForCausalLM

    from qlora_cli.core.models import load_run
    from qlora_cli.export.merge import merge_run
    from qlora_cli.train.run import run_training

    path = write_recipe(tmp_path, tiny_model_dir, VARIANTS[name], save_steps=3)
    straight = run_training(load_recipe(path, output_dir=tmp_path / "straight"), console=quiet()).summary
    assert straight["final_loss"] < straight["first_loss"]
    # The same run stopped after its checkpoint at step 3, then resumed to step 6.
    halted = tmp_path / "halted"
    run_training(load_recipe(path, ["training.max_steps=3"], output_dir=halted), console=quiet())
    run_training(load_recipe(path, output_dir=halted), resume=True, console=quiet())
    expected, got = metrics(tmp_path / "straight"), metrics(halted)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 7))
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) < 1e-5
    adapter_a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(halted / "adapter" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    assert max((adapter_a[k] - adapter_b[k]).abs().max().item() for k in adapter_a) < 1e-5
    if name == "dora":
        assert any("lora_magnitude_vector" in key for key in adapter_a)
    if name == "modules_to_save":
        # peft saves the full copies under the modules' own names
        assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(adapter_a)

    report = merge_run(halted, out=tmp_path / "merged", dtype_name="float32", console=quiet())
    assert report["mean_kl_nats_per_token"] < 1e-6 and report["max_abs_logit_diff"] < 1e-4
    # The merged checkpoint, loaded by plain transformers, computes what the trained model (load_run) computes.
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    trained = load_run(halted).model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (trained(input_ids=ids).logits.float() - merged(input_ids=ids).logits).abs().max().item()
    assert difference < 1e-4
    if name == "modules_to_save":  # the trained copies, not the base's modules, are in the merged checkpoint
        head = adapter_a["base_model.model.lm_head.weight"]
        base = load_file(tiny_model_dir / "model.safetensors")
        assert torch.equal(merged.lm_head.weight, head.float())
        assert not torch.equal(merged.lm_head.weight, base["lm_head.weight"].float())


@pytest.mark.slow
def test_dora_merged_gguf_is_written(tmp_path, chatml_model_dir):
    """llama.cpp has no DoRA, but the merge folds the magnitude into the weights, so the merged model exports."""
    from qlora_cli.export.merge import merge_run
    from qlora_cli.train.run import run_training

    path = write_recipe(tmp_path, chatml_model_dir, VARIANTS["dora"], max_steps=3)
    run_training(load_recipe(path), console=quiet())
    report = merge_run(tmp_path / "run", gguf_types=("f16",), console=quiet())
    assert report["mean_kl_nats_per_token"] < 1e-3
    written = report["gguf"]["f16"]
    assert (tmp_path / "run" / "merged" / written["file"]).is_file()
    assert written["mean_kl_nats_per_token"] < 1e-3  # the GGUF file, read back, against the merged model
