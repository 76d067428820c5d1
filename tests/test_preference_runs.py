"""Whole preference runs on the tiny model: each method through `qlora train`, SFT then DPO from the SFT run,
exact resume after SIGINT and two data-parallel processes for DPO."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import ALPACA_ROWS, interrupt_at_checkpoint, tiny_recipe_text, write_jsonl
from qlora_cli.core.recipe import load_recipe
from qlora_cli.train.run import run_training
from test_preference import KTO_ROWS, PAIRS

pytestmark = pytest.mark.slow


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def preference_recipe(tmp_path: Path, model_dir: Path, method: str, **training) -> Path:
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    write_jsonl(tmp_path / "heldout.jsonl", PAIRS[:2])
    path = tmp_path / f"{method}.yaml"
    text = tiny_recipe_text(model_dir, ["pairs.jsonl"], method=method, **training)
    path.write_text(text.replace("  max_seq_len: 128\n", "  max_seq_len: 128\n  eval:\n    - path: heldout.jsonl\n"))
    return path


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_every_preference_method_trains_end_to_end(tmp_path, tiny_model_dir, method):
    recipe = load_recipe(preference_recipe(tmp_path, tiny_model_dir, method, max_steps=6), output_dir=tmp_path / "run")
    summary = run_training(recipe, console=quiet()).summary
    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert "rewards/chosen" in logged[0] and "logps/chosen" in logged[-1]
    if method == "dpo":
        assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert logged[-1]["loss"] < logged[0]["loss"]  # 1e-3 on 12 pairs moves it within 6 steps
    assert summary["method"] == method and math.isfinite(summary["eval_loss"])
    assert "eval_rewards/chosen" in summary and "eval_rewards/chosen" in records(tmp_path / "run", "eval_metrics.jsonl")[-1]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_kto_trains_on_unpaired_rows(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "kto.jsonl", KTO_ROWS * 4)
    path = tmp_path / "kto.yaml"
    path.write_text(tiny_recipe_text(tiny_model_dir, ["kto.jsonl"], method="kto", max_steps=3))
    summary = run_training(load_recipe(path, output_dir=tmp_path / "run"), console=quiet()).summary
    assert summary["examples"] == 8 and math.isfinite(summary["final_loss"])


def test_sft_then_dpo_continues_the_sft_adapter_against_it(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    sft = tmp_path / "sft.yaml"
    sft.write_text(tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl"], max_steps=3))
    run_training(load_recipe(sft, output_dir=tmp_path / "sft"), console=quiet())
    sft_adapter = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")

    dpo = preference_recipe(tmp_path, tiny_model_dir, "dpo", max_steps=4)
    dpo.write_text(dpo.read_text().replace("model:\n", "model:\n  adapter: sft\n", 1))
    trained = run_training(load_recipe(dpo, output_dir=tmp_path / "dpo"), console=quiet())
    logged = records(tmp_path / "dpo")
    # The reference is the SFT model, which the trained adapter starts from: DPO starts at ln 2 again.
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[-1]["rewards/margins"] != 0
    # The reference stayed the SFT adapter; the trained one moved from it; only the trained one is saved.
    model = trained.model
    reference = {name: p for name, p in model.named_parameters() if ".reference." in name}
    assert reference and not any(p.requires_grad for p in reference.values())
    for name, value in sft_adapter.items():
        key = name.replace(".lora_A.weight", ".lora_A.reference.weight").replace(".lora_B.weight", ".lora_B.reference.weight")
        assert torch.equal(reference["base_model.model." + key.removeprefix("base_model.model.")].detach().cpu(), value)
    saved = load_file(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == sft_adapter.keys()
    assert any(not torch.equal(saved[k], sft_adapter[k]) for k in saved)
    assert not (tmp_path / "dpo" / "adapter" / "reference").exists()


def test_continuing_a_run_on_another_base_is_refused(tmp_path, tiny_model_dir, chatml_model_dir, capsys):
    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    sft = tmp_path / "sft.yaml"
    sft.write_text(tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl"], max_steps=1))
    run_training(load_recipe(sft, output_dir=tmp_path / "sft"), console=quiet())
    other = preference_recipe(tmp_path, chatml_model_dir, "dpo")
    other.write_text(other.read_text().replace("model:\n", "model:\n  adapter: sft\n", 1))
    from qlora_cli.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["train", str(other), "--output-dir", str(tmp_path / "dpo")])
    assert caught.value.code == 2
    assert "was trained on" in capsys.readouterr().err
    assert not (tmp_path / "dpo").exists()


def test_dpo_resumes_after_sigint_exactly(tmp_path, tiny_model_dir):
    steps = 24
    recipe = preference_recipe(tmp_path, tiny_model_dir, "dpo", max_steps=steps, save_steps=3)
    recipe.write_text(recipe.read_text().replace("  dropout: 0.0\n", "  dropout: 0.1\n"))
    straight = tmp_path / "straight"
    run_training(load_recipe(recipe, output_dir=straight), console=quiet())
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--output-dir", str(interrupted)]
    interrupt_at_checkpoint(command, interrupted, step=6)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = records(straight), records(interrupted)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for name in ("loss", "rewards/margins", "logps/chosen"):
        assert max(abs(a[name] - b[name]) for a, b in zip(expected, got)) < 1e-5, name


def test_dpo_in_two_processes_equals_one_process_with_the_global_batch(tmp_path, tiny_model_dir):
    recipe = preference_recipe(tmp_path, tiny_model_dir, "dpo", max_steps=3, batch_size=2)
    recipe.write_text(recipe.read_text().replace("data:\n", "data:\n  group_by_length: false\n"))

    def train(out, *extra):
        command = [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--output-dir", str(out), *extra]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return records(out)

    two = train(tmp_path / "two", "--nproc", "2")
    one = train(tmp_path / "one", "--set", "training.batch_size=4")
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert max(abs(a[name] - b[name]) for a, b in zip(one, two)) < 1e-4, name
    assert len(two) == 3
