"""Data-parallel training with 2 processes on CPU (gloo), through `qlora train --nproc 2`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--output-dir", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture
def recipe(tmp_path, tiny_model_dir) -> Path:
    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS * 4)
    path = tmp_path / "tiny.yaml"
    # Random (seeded) order, so that 2 x batch b and 1 x batch 2b see the same examples at every step.
    path.write_text(tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl"], max_steps=4, batch_size=2).replace(
        "data:\n", "data:\n  group_by_length: false\n"))
    return path


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(recipe, tmp_path):
    two = train(recipe, tmp_path / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(recipe, tmp_path / "one", "--set", "training.batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]
    assert len(losses(tmp_path / "two")) == 4
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two"))) < 1e-4
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_size"] == 4
    assert summary["train_tokens"] == json.loads((tmp_path / "one" / "summary.json").read_text())["train_tokens"]
    # One run directory, written by rank 0 alone.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "loss.png", "metrics.jsonl", "parity_prompts.json", "recipe.yaml", "summary.json"]
    # No rank prints a library line the user cannot act on (bitsandbytes' kernel fetch: on CPUs with AVX512-BF16).
    from qlora_cli.core.compat import ACCELERATE_THREADS_MESSAGE, BITSANDBYTES_CPU_KERNEL_MESSAGE

    for line in (BITSANDBYTES_CPU_KERNEL_MESSAGE, ACCELERATE_THREADS_MESSAGE):
        assert line not in two.stdout + two.stderr


@pytest.mark.slow
def test_checkpoints_and_exact_resume_under_ddp(recipe, tmp_path):
    straight = train(recipe, tmp_path / "straight", "--nproc", "2", "--set", "training.max_steps=6")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train(recipe, tmp_path / "resumed", "--nproc", "2", "--set", "training.save_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((tmp_path / "resumed" / "checkpoints" / "step-4" / "manifest.json").read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])
    resumed = train(recipe, tmp_path / "resumed", "--nproc", "2", "--resume", "--set", "training.save_steps=2",
                    "--set", "training.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "straight"), losses(tmp_path / "resumed"))) < 1e-5
    assert len(losses(tmp_path / "resumed")) == 6


@pytest.mark.slow
def test_a_bad_row_stops_every_rank_with_its_message(recipe, tmp_path):
    with (recipe.parent / "alpaca.jsonl").open("a") as handle:
        handle.write('{"instruction": "no answer"}\n')
    # Through --nproc, the row is reported once, before any process starts.
    launched = train(recipe, tmp_path / "run", "--nproc", "2")
    assert launched.returncode == 2 and "alpaca.jsonl:17" in launched.stderr
    # Under torchrun directly, each rank checks the data itself and none hangs.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "qlora_cli",
               "train", str(recipe), "--output-dir", str(tmp_path / "run")]
    direct = subprocess.run(command, capture_output=True, text=True)
    assert direct.returncode != 0 and "alpaca.jsonl:17: alpaca row: missing field `output`" in direct.stderr
    assert not (tmp_path / "run").exists()


def test_fsdp_on_cpu_is_refused_rather_than_silently_replicated(recipe, tmp_path):
    result = train(recipe, tmp_path / "run", "--nproc", "2", "--set", "training.distributed=fsdp")
    assert result.returncode == 2 and "fsdp needs GPUs" in result.stderr
    assert not (tmp_path / "run").exists()
