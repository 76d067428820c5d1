"""Runs that survive: atomic checkpoints, exact resume after a real SIGINT, and clean failures."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import interrupt_at_checkpoint
from qlora_cli.cli import main
from qlora_cli.core.recipe import load_recipe
from qlora_cli.train.run import run_training

STEPS = 60


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture
def recipe_path(tiny_recipe):
    # Dropout on, so that resuming must restore the RNG states too; length-grouped random batches.
    text = tiny_recipe.read_text().replace("  dropout: 0.0\n", "  dropout: 0.1\n")
    text = text.replace("max_steps: 4", f"max_steps: {STEPS}").replace("training:\n", "training:\n  save_steps: 3\n")
    tiny_recipe.write_text(text)
    return tiny_recipe


@pytest.mark.slow
def test_resume_after_sigint_equals_an_uninterrupted_run(recipe_path, tmp_path):
    straight = tmp_path / "straight"
    run_training(load_recipe(recipe_path, output_dir=straight), console=quiet())

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "qlora_cli", "train", str(recipe_path), "--output-dir", str(interrupted)]
    err = interrupt_at_checkpoint(command, interrupted, step=6)
    assert "Resume with: qlora train" in err and "--resume" in err
    stopped = max(int(p.name.removeprefix("step-")) for p in (interrupted / "checkpoints").iterdir())
    assert 6 <= stopped < STEPS
    assert not (interrupted / "adapter").exists()

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped}" in resumed.stdout

    expected, got = losses(straight), losses(interrupted)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) < 1e-5
    expected_adapter, got_adapter = adapter(straight), adapter(interrupted)
    assert expected_adapter.keys() == got_adapter.keys()
    assert max((expected_adapter[k] - got_adapter[k]).abs().max().item() for k in expected_adapter) < 1e-5
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped
    # Time and speed are the whole run's: the metrics' clock goes on across the resume.
    elapsed = [json.loads(line)["elapsed_seconds"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert elapsed == sorted(elapsed)
    assert summary["train_seconds"] > summary["session_train_seconds"] > 0
    assert summary["tokens_per_second"] == pytest.approx(summary["train_tokens"] / summary["train_seconds"], rel=0.01)
    assert summary["train_tokens"] == json.loads((straight / "summary.json").read_text())["train_tokens"]


def test_checkpoints_are_sealed_and_pruned(recipe_path, tmp_path):
    run_dir = tmp_path / "run"
    run_training(load_recipe(recipe_path, ["training.max_steps=9"], output_dir=run_dir), console=quiet())
    folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert folders == ["step-6", "step-9"]  # keep_checkpoints: 2; no staging left behind
    manifest = json.loads((run_dir / "checkpoints" / "step-9" / "manifest.json").read_text())
    assert manifest["step"] == 9
    names = set(manifest["files"])
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
    assert {"recipe_fingerprint", "data_fingerprint", "fed_tokens", "versions"} <= set(manifest)


def test_damaged_and_unfinished_checkpoints_are_skipped(recipe_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(load_recipe(recipe_path, ["training.max_steps=9"], output_dir=run_dir), console=quiet())
    newest = run_dir / "checkpoints" / "step-9"
    tensors = newest / "adapter_model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # truncated mid-write
    unfinished = run_dir / "checkpoints" / "step-12"
    unfinished.mkdir()  # no manifest: never completed
    main(["train", str(recipe_path), "--output-dir", str(run_dir), "--resume", "--set", "training.max_steps=10"])
    out = capsys.readouterr().out
    assert "step-12: it has no manifest" in out
    assert "step-9: adapter_model.safetensors has" in out
    assert "Resuming from" in out and "step-6" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6
    manifest = json.loads((run_dir / "checkpoints" / "step-6" / "manifest.json").read_text())
    assert summary["train_seconds"] == pytest.approx(manifest["train_seconds"] + summary["session_train_seconds"], abs=0.01)
    assert summary["tokens_per_second"] is not None
    elapsed = [json.loads(line)["elapsed_seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert elapsed == sorted(elapsed) and elapsed[-1] > manifest["train_seconds"]


def test_resume_refuses_a_recipe_that_changed_what_is_trained(recipe_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(load_recipe(recipe_path, ["training.max_steps=3"], output_dir=run_dir), console=quiet())
    with pytest.raises(SystemExit) as exited:
        main(["train", str(recipe_path), "--output-dir", str(run_dir), "--resume", "--set", "lora.r=4",
              "--set", "training.batch_size=1"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "lora.r: 8 -> 4" in err and "training.batch_size: 2 -> 1" in err
    # A longer run is a harmless change, and is reported.
    main(["train", str(recipe_path), "--output-dir", str(run_dir), "--resume", "--set", "training.max_steps=5"])
    assert "training.max_steps: 3 -> 5" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_exit_2(recipe_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(load_recipe(recipe_path, ["training.max_steps=2"], output_dir=run_dir), console=quiet())
    with pytest.raises(SystemExit) as exited:  # a longer run, from a run that saved no checkpoint (save_steps: 3)
        main(["train", str(recipe_path), "--output-dir", str(run_dir), "--resume", "--set", "training.max_steps=4"])
    assert exited.value.code == 2 and "no complete checkpoint" in capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing_until_the_run_is_made_longer(recipe_path, tmp_path, capsys):
    """A job scheduler may pass --resume every time: a finished run says so and stays as it is, byte for byte;
    raising max_steps (or epochs) continues it from its checkpoint."""
    run_dir = tmp_path / "run"
    command = ["train", str(recipe_path), "--output-dir", str(run_dir), "--set", "training.max_steps=3"]
    main(command)
    capsys.readouterr()
    before = snapshot(run_dir)
    assert "checkpoints/step-3/manifest.json" in before and "adapter/adapter_model.safetensors" in before

    main(command + ["--resume"])
    out = capsys.readouterr().out
    assert "has finished (3 steps" in out and "nothing was changed" in out and "step 4" not in out
    assert snapshot(run_dir) == before
    # A larger max_steps trains further; without max_steps the epochs decide, and more epochs than were done
    # train further. All seen from the summary alone (nothing else is read or loaded).
    from qlora_cli.train.checkpoint import finished_run

    assert finished_run(run_dir, load_recipe(recipe_path, ["training.max_steps=2"], output_dir=run_dir)) is not None
    assert finished_run(run_dir, load_recipe(recipe_path, ["training.max_steps=4"], output_dir=run_dir)) is None
    epochs = json.loads(before["summary.json"])["epochs"]
    assert epochs > 0
    text = recipe_path.read_text().replace("  max_steps: 60\n", "")
    epochs_recipe = tmp_path / "epochs.yaml"
    epochs_recipe.write_text(text.replace("training:\n", f"training:\n  epochs: {epochs}\n"))
    assert finished_run(run_dir, load_recipe(epochs_recipe, output_dir=run_dir)) is not None
    epochs_recipe.write_text(text.replace("training:\n", f"training:\n  epochs: {epochs + 0.5}\n"))
    assert finished_run(run_dir, load_recipe(epochs_recipe, output_dir=run_dir)) is None

    main(command[:-1] + ["training.max_steps=4", "--resume"])
    out = capsys.readouterr().out
    assert "Resuming from" in out and "step-3" in out and "has finished" not in out
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() != before["adapter/adapter_model.safetensors"]


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(recipe_path, tmp_path, capsys, monkeypatch):
    from transformers import Trainer

    real = Trainer.training_step

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 4 else loss  # the 5th update

    monkeypatch.setattr(Trainer, "training_step", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main(["train", str(recipe_path), "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert "non-finite at step 5" in err and "step-3" in err and "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3"]


def test_out_of_memory_names_the_batch_and_what_to_lower(recipe_path, tmp_path, capsys, monkeypatch):
    from transformers import Trainer

    def exhausted(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Trainer, "training_step", exhausted)
    with pytest.raises(SystemExit) as exited:
        main(["train", str(recipe_path), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert "out of memory at step 1 on a batch of 2 x" in err and "training.batch_size 2" in err
    assert "gradient_checkpointing" in err


def test_full_disk_is_detected_before_a_checkpoint_is_written(recipe_path, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main(["train", str(recipe_path), "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "not enough free disk for the checkpoint of step 3" in err
    assert not (run_dir / "checkpoints").exists()


def test_a_non_finite_micro_batch_stops_its_update():
    from qlora_cli.train.callbacks import NonFiniteGuard, NonFiniteLoss

    class State:
        global_step = 6

    guard = NonFiniteGuard()
    for loss in (1.0, float("nan"), 2.0):  # one accumulation window: the bad loss is not the last
        guard.observe(torch.tensor(loss))
    with pytest.raises(NonFiniteLoss) as stopped:
        guard.on_pre_optimizer_step(None, State(), None)
    assert stopped.value.step == 7
    guard.observe(torch.tensor(3.0))
    guard.on_pre_optimizer_step(None, State(), None)  # the next window is checked afresh


def test_a_metrics_log_torn_by_a_kill_is_read_up_to_its_last_whole_record(tmp_path):
    from qlora_cli.train.callbacks import read_records
    from qlora_cli.core.errors import UserError

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    assert read_records(log, up_to_step=2) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.4}]
    assert log.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n'
    log.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo\n{"step": 3, "loss": 2.3}\n')
    with pytest.raises(UserError) as error:
        read_records(log, up_to_step=3)
    assert f"{log}:2" in error.value.render()
