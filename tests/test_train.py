"""The training stage on a tiny 2-layer Llama, through the same code path as a real run."""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import ALPACA_ROWS, CHAT_ROWS
from qlora_cli.cli import main
from qlora_cli.core.context import RunContext
from qlora_cli.train.model import load_model
from qlora_cli.core.recipe import load_recipe
from qlora_cli.train.run import run_training

# Losses of the golden run below (CPU, float32, seed 0, length-grouped batches). A change here is a change in what is trained.
GOLDEN_LOSSES = [6.020361423492432, 6.022075653076172, 5.970609188079834, 5.978979587554932]

EXPECTED_TREE = [
    "adapter",
    "adapter/README.md",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/chat_template.jinja",
    "adapter/tokenizer.json",
    "adapter/tokenizer_config.json",
    "loss.png",
    "metrics.jsonl",
    "parity_prompts.json",
    "recipe.yaml",
    "summary.json",
]

PROBE_IDS = [[1, 40, 41, 42, 43, 44, 45, 2]]
CPU_FLOAT32 = RunContext("cpu", torch.float32)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory, tiny_model_dir):
    import bitsandbytes as bnb
    from conftest import ALPACA_ROWS, CHAT_ROWS, tiny_recipe_text, write_jsonl

    folder = tmp_path_factory.mktemp("golden")
    write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(folder / "chat.jsonl", CHAT_ROWS)
    path = folder / "tiny.yaml"
    path.write_text(tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl", "chat.jsonl"]) + "output:\n  dir: run\n")
    run = run_training(load_recipe(path), console=quiet())
    run.quant_states_as_trained = [
        (m.weight.quant_state.quant_type, m.weight.quant_state.nested)
        for m in run.model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    ]
    run.model.eval()
    with torch.no_grad():
        logits = run.model(input_ids=torch.tensor(PROBE_IDS, device=run.model.device)).logits.cpu()
    return folder / "run", run, logits


def test_golden_run_losses_and_tree(golden_run):
    run_dir, run, _ = golden_run
    tree = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert tree == EXPECTED_TREE
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    losses = [r["loss"] for r in records]
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4, abs=1e-5)
    assert all(set(r) >= {"step", "loss", "learning_rate", "tokens"} for r in records)
    # Tokens only ever grow and end at the summary's count of non-padding tokens.
    tokens = [r["tokens"] for r in records]
    assert tokens == sorted(tokens) and tokens[0] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_tokens"] == tokens[-1]
    assert summary["final_loss"] == losses[-1] and summary["first_loss"] == losses[0]
    assert summary["compute_dtype"] == "float32" and summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert summary["train_seconds"] > 0 and summary["peak_memory_bytes"] > 0
    if summary["device"] == "cpu" and Path("/proc/self/status").is_file():  # Linux says what is anonymous
        assert summary["peak_memory_kind"].startswith("anonymous memory")
        assert summary["peak_memory_bytes"] <= summary["peak_rss_bytes"]
    assert summary["planned_memory_bytes"] > 0
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(summary["versions"])
    assert summary["qlora_version"] == importlib.metadata.version("qlora-cli")


def test_run_is_4bit_nf4_double_quant_with_lora_on_every_linear(golden_run):
    import bitsandbytes as bnb

    _, run, _ = golden_run
    base = run.model.base_model.model
    linear4 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert run.quant_states_as_trained == [("nf4", True)] * len(linear4)
    lora_targets = {name.split(".")[-4] for name, _ in run.model.named_parameters() if "lora_A" in name}
    assert lora_targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)


@pytest.mark.slow
def test_adapter_reloads_in_a_fresh_process_with_identical_logits(golden_run, tmp_path):
    run_dir, _, logits = golden_run
    expected = tmp_path / "expected.pt"
    torch.save(logits, expected)
    script = f"""
import torch
from peft import AutoPeftModelForCausalLM
from transformers import BitsAndBytesConfig
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
device = "cuda" if torch.cuda.is_available() else "cpu"  # where qlora trained it
model = AutoPeftModelForCausalLM.from_pretrained({str(run_dir / "adapter")!r}, quantization_config=quant,
                                                 dtype=torch.float32, device_map={{"": device}})
model.eval()
# The same 4-bit kernels as in training on both sides of the comparison.
from qlora_cli.core.compat import keep_4bit_training_kernels
keep_4bit_training_kernels(model)
with torch.no_grad():
    logits = model(input_ids=torch.tensor({PROBE_IDS}, device=device)).logits.cpu()
expected = torch.load({str(expected)!r})
difference = (logits - expected).abs().max().item()
print("max_abs_diff", difference)
assert difference < 1e-5, difference
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_abs_diff" in result.stdout


def test_adapter_carries_the_chat_template(golden_run, tiny_tokenizer):
    run_dir, _, _ = golden_run
    saved = (run_dir / "adapter" / "chat_template.jinja").read_text()
    assert saved == tiny_tokenizer.chat_template


def test_every_lora_b_gets_a_gradient_with_checkpointing(tiny_recipe, tiny_model_dir):
    recipe = load_recipe(tiny_recipe)
    assert recipe.training.gradient_checkpointing
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), recipe, CPU_FLOAT32, checkpointing=True)
    assert model.base_model.model.is_activation_checkpointing
    model.train()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert len(lora_b) == 14
    for name, parameter in lora_b.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_existing_run_dir_is_refused_and_left_alone(tiny_recipe, capsys):
    run_dir = tiny_recipe.parent / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("an earlier run")
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tiny_recipe)])
    assert exited.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run_dir / "recipe.yaml").read_text() == "an earlier run"


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_recipe, capsys):
    run_dir = tiny_recipe.parent / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tiny_recipe), "--overwrite"])
    assert exited.value.code == 2 and "not a qlora run" in capsys.readouterr().err
    assert (run_dir / "keep.txt").read_text() == "precious"


def test_bad_row_stops_before_anything_is_written(tiny_recipe, capsys):
    with (tiny_recipe.parent / "chat.jsonl").open("a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "no reply"}]}\n')
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tiny_recipe)])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "chat.jsonl:3" in err and "no assistant message" in err
    assert "Traceback" not in err
    assert not (tiny_recipe.parent / "run").exists()


def test_fp16_on_cpu_is_refused_with_the_fix(tiny_recipe, capsys, monkeypatch):
    monkeypatch.setattr("qlora_cli.core.context.detect_device", lambda: "cpu")  # also on a machine with a GPU
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tiny_recipe), "--set", "quantization.compute_dtype=float16"])
    assert exited.value.code == 2
    assert "use float32 or auto" in capsys.readouterr().err
    assert not (tiny_recipe.parent / "run").exists()


def test_packed_run_with_evaluation(tiny_recipe):
    text = tiny_recipe.read_text().replace("data:\n", "data:\n  packing: true\n  eval_size: 2\n")
    text = text.replace("training:\n", "training:\n  eval_steps: 2\n")
    tiny_recipe.write_text(text)
    run = run_training(load_recipe(tiny_recipe), console=quiet())
    run_dir = tiny_recipe.parent / "run"
    summary = run.summary
    assert summary["padding_fraction"] == 0 and summary["fed_positions"] == summary["train_tokens"]
    evals = [json.loads(line) for line in (run_dir / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 4]  # every 2 updates, and once more at the end
    assert summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert summary["rows_per_source"] == {str(tiny_recipe.parent / "alpaca.jsonl"): 3, str(tiny_recipe.parent / "chat.jsonl"): 1}


def test_padded_run_reports_its_padding(golden_run):
    run_dir, run, _ = golden_run
    summary = run.summary
    assert 0 < summary["padding_fraction"] < 1
    assert summary["fed_positions"] > summary["train_tokens"]


def test_every_format_recipe_trains_through_every_reader(tiny_model_dir, tmp_path):
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "examples" / "every-format.yaml"
    recipe = load_recipe(recipe_path, [f"model.base={tiny_model_dir}", "training.max_steps=2", "training.eval_steps=1"],
                         output_dir=tmp_path / "run")
    summary = run_training(recipe, console=quiet()).summary
    assert len(summary["rows_per_source"]) == 7 and all(count > 0 for count in summary["rows_per_source"].values())
    assert summary["steps"] == 2 and summary["padding_fraction"] == 0 and summary["eval_loss"] is not None


def test_skip_trains_on_the_good_rows(tiny_recipe):
    with (tiny_recipe.parent / "chat.jsonl").open("a") as handle:
        handle.write('{"messages": "not a list"}\n')
    recipe = load_recipe(tiny_recipe, ["data.on_bad_row=skip", "training.max_steps=1"])
    summary = run_training(recipe, console=quiet()).summary
    assert summary["skipped_bad_rows"] == 1 and summary["examples"] == len(ALPACA_ROWS) + len(CHAT_ROWS)


def test_pickle_weights_need_an_explicit_opt_in(tiny_model_dir, tmp_path, tiny_recipe, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    model = AutoModelForCausalLM.from_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tiny_recipe), "--set", f"model.base={pickled}", "--set", "training.max_steps=1"])
    assert exited.value.code == 2 and "allow_pickle_weights" in capsys.readouterr().err
    assert not (tiny_recipe.parent / "run").exists()


def test_auto_checkpointing_follows_the_memory_plan(tiny_recipe, tiny_model_dir, monkeypatch):
    import qlora_cli.train.model as models

    recipe = load_recipe(tiny_recipe, ["training.gradient_checkpointing=auto"])
    on, why = models.decide_checkpointing(recipe, str(tiny_model_dir), CPU_FLOAT32)
    assert on is False and "fits without" in why
    monkeypatch.setattr(models, "available_memory_bytes", lambda device: 2 * 1024 * 1024)
    on, why = models.decide_checkpointing(recipe, str(tiny_model_dir), CPU_FLOAT32)
    assert on is True and "needs" in why
    explicit = load_recipe(tiny_recipe)
    assert models.decide_checkpointing(explicit, str(tiny_model_dir), CPU_FLOAT32) == (True, "set in the recipe")


@pytest.mark.parametrize("bits", [8, 16])
def test_8_bit_and_unquantized_bases_train(tiny_recipe, bits):
    recipe = load_recipe(tiny_recipe, [f"quantization.bits={bits}", "training.max_steps=2"])
    run = run_training(recipe, console=quiet())
    assert run.summary["steps"] == 2 and math.isfinite(run.summary["final_loss"])
    import bitsandbytes as bnb

    layer = run.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt) if bits == 8 else type(layer) is torch.nn.Linear


def test_fsdp_in_one_cpu_process_is_refused(tiny_recipe, capsys, monkeypatch):
    monkeypatch.setattr("qlora_cli.core.context.detect_device", lambda: "cpu")
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tiny_recipe), "--set", "training.distributed=fsdp"])
    assert exited.value.code == 2 and "fsdp needs GPUs" in capsys.readouterr().err
    assert not (tiny_recipe.parent / "run").exists()


def test_train_time_stops_with_training_not_with_the_final_evaluation(tiny_recipe):
    """summary.json's train_seconds and tokens/s count the training loop, not the evaluation and saving after it."""
    from rich.console import Console

    from qlora_cli.core.recipe import load_recipe
    from qlora_cli.train.run import fit, setup

    run = setup(load_recipe(tiny_recipe, ["training.max_steps=1"]), console=Console(file=io.StringIO()))
    result = fit(run)
    first = result.clock.session
    time.sleep(0.01)
    assert result.clock.session == first > 0
