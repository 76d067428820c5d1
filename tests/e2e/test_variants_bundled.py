"""LoRA variants on the bundled SmolLM2-135M-Instruct, through the `qlora` command: the quickstart with DoRA,
rsLoRA, LoftQ's start or the output head trained in full trains, resumes exactly from a checkpoint, and merges
(float32, into the dequantized base) with its parity report passing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import real_model_env

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.e2e

VARIANTS = {
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "loftq": ["lora.init_lora_weights=loftq"],
    "modules_to_save": ["lora.modules_to_save=[lm_head]"],
}


def qlora(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "qlora_cli", *args], capture_output=True, text=True,
                            env=real_model_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_on_the_bundled_model_resumes_exactly_and_merges(tmp_path, name):
    # float32 compute on every CPU, so that the merge's parity limit (float32, dequantized base) applies
    keys = [*VARIANTS[name], "quantization.compute_dtype=float32", "training.save_steps=1", "training.logging_steps=1",
            "training.max_steps=2"]
    sets = [part for key in keys for part in ("--set", key)]
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    qlora("train", str(QUICKSTART), *sets, "--output-dir", str(straight))
    qlora("train", str(QUICKSTART), *sets, "--set", "training.max_steps=1", "--output-dir", str(halted))
    qlora("train", str(QUICKSTART), *sets, "--output-dir", str(halted), "--resume")
    assert len(losses(straight)) == 2
    assert max(abs(a - b) for a, b in zip(losses(straight), losses(halted), strict=True)) < 1e-4
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(halted / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    qlora("merge", str(halted), "--dtype", "float32")
    report = json.loads((halted / "merged" / "merge_report.json").read_text())
    assert report["kl_limit"] == 1e-3 and report["mean_kl_nats_per_token"] < 1e-4, report
