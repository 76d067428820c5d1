"""Merging on a tiny trained run: parity with the trained model, loading in plain transformers, atomicity."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from conftest import train_tiny_run
from qlora_cli.cli import main
from qlora_cli.merge import merge_run
from qlora_cli.models import load_run
from qlora_cli.recipe import load_recipe
from qlora_cli.train import run_training

PROMPT_IDS = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("merge")
    # Enough steps at a high rate that the adapter moves the logits well away from the base's.
    train_tiny_run(folder, tiny_model_dir, chat=True, max_steps=8, learning_rate=5e-3)
    return folder / "run"


def trained_logits(run_dir):
    loaded = load_run(run_dir)
    with torch.no_grad():
        return loaded.model(input_ids=torch.tensor([PROMPT_IDS], device=loaded.model.device)).logits.cpu(), loaded


def test_dequantized_float32_merge_matches_the_trained_model(trained_run, tmp_path):
    out = tmp_path / "merged"
    report = merge_run(trained_run, out=out, dtype_name="float32", say=lambda *_: None)
    assert report["mean_kl_nats_per_token"] < 1e-6
    assert report["max_abs_logit_diff"] < 1e-4
    assert json.loads((out / "merge_report.json").read_text())["base"] == "dequantized"
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


def test_original_base_drifts_and_the_report_says_so(trained_run, tmp_path):
    exact = merge_run(trained_run, out=tmp_path / "a", dtype_name="float32", say=lambda *_: None)
    drift = merge_run(trained_run, out=tmp_path / "b", dtype_name="float32", base="original", say=lambda *_: None)
    assert drift["base"] == "original" and drift["kl_limit"] is None
    assert drift["mean_kl_nats_per_token"] > 100 * max(exact["mean_kl_nats_per_token"], 1e-9)


@pytest.mark.slow
def test_merged_dir_loads_in_a_fresh_process_and_generates_like_the_adapter(trained_run, tmp_path):
    out = tmp_path / "merged"
    merge_run(trained_run, out=out, dtype_name="float32", say=lambda *_: None)
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
    from transformers import PreTrainedModel

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        merge_run(trained_run, out=out, dtype_name="float32", say=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_writes_nothing(trained_run, tmp_path, monkeypatch):
    import qlora_cli.merge as merge_module

    monkeypatch.setattr(merge_module, "KL_LIMIT", 0.0)
    with pytest.raises(Exception) as caught:
        merge_run(trained_run, out=tmp_path / "merged", dtype_name="float32", say=lambda *_: None)
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


def test_output_merge_in_the_recipe_merges_after_training(tmp_path, tiny_model_dir):
    from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl

    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl"], max_steps=2) + "output:\n  dir: run\n  merge: true\n")
    summary = run_training(load_recipe(path), console=Console(file=io.StringIO())).summary
    report = json.loads((tmp_path / "run" / "merged" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["base"] == "dequantized"
    assert summary["merged"]["out"] == str(tmp_path / "run" / "merged")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["merged"] == summary["merged"]


def test_gguf_export_loads_back_with_the_same_logits_and_tokens(trained_run, tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    report = merge_run(trained_run, out=out, dtype_name="float32", gguf_types=("f16", "q8_0"), say=lambda *_: None)
    f16, q8 = report["gguf"]["f16"], report["gguf"]["q8_0"]
    assert (out / "model-f16.gguf").is_file() and (out / "model-q8_0.gguf").is_file()
    assert f16["mean_kl_nats_per_token"] < 1e-4 and f16["max_abs_logit_diff"] < 0.05
    assert q8["bytes"] < f16["bytes"] and q8["mean_kl_nats_per_token"] < 1e-2
    reloaded = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    text = "<s><|user|>\nWhat is the capital of France?</s>"
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert json.loads((out / "merge_report.json").read_text())["gguf"]["f16"]["file"] == "model-f16.gguf"
    # An Ollama Modelfile beside each file, and llama.cpp's tokenizer consulted where it is installed.
    for out_type in ("f16", "q8_0"):
        modelfile = (out / f"model-{out_type}.Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./model-{out_type}.gguf\nTEMPLATE") and report["gguf"][out_type]["modelfile"]["template"]
        check = report["gguf"][out_type]["llama_cpp"]
        if check["checked"]:
            assert check["identical"] == check["lines"], check["mismatches"]
        else:
            assert "pip install llama-cpp-python" in check["reason"]
