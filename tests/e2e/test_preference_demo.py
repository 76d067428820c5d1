"""End to end on the bundled SmolLM2-135M-Instruct: the DPO demo (recipes/dpo/quickstart.yaml) through the `qlora`
command, and its figures: the first logged loss is ln 2 (the new adapter is the reference), the held-out pairs'
reward accuracy reaches 0.8, and a merge of the result passes its parity check; ORPO and KTO train the same data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import real_model_env

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def train(recipe: str, run_dir: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "qlora_cli", "train", str(REPO / "recipes" / recipe), "--output-dir",
               str(run_dir), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=real_model_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def dpo_demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "dpo"
    return run_dir, train("dpo/quickstart.yaml", run_dir)


def test_dpo_demo_starts_at_ln2_and_prefers_the_held_out_pirate_answers(dpo_demo):
    run_dir, summary = dpo_demo
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) <= 0.005, first
    assert summary["eval_rewards/accuracies"] >= 0.8, summary
    assert summary["eval_rewards/margins"] > 0


def test_dpo_demo_merges_with_its_parity_report(dpo_demo, tmp_path):
    run_dir, _ = dpo_demo
    result = subprocess.run([sys.executable, "-m", "qlora_cli", "merge", str(run_dir), "--out", str(tmp_path / "m")],
                            capture_output=True, text=True, env=real_model_env())
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_demos_train(tmp_path, method):
    summary = train(f"{method}/quickstart.yaml", tmp_path / method, "--set", "training.max_steps=5")
    assert summary["steps"] == 5 and math.isfinite(summary["final_loss"]) and "rewards/chosen" in summary
