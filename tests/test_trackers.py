"""Experiment trackers (training.report_to): configured per run, refused before loading when not installed, and
the scalars they log read back with each library's own reader and compared with metrics.jsonl."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest
from rich.console import Console

from conftest import ALPACA_ROWS, tiny_recipe_text, write_jsonl
from qlora_cli.core.errors import UserError
from qlora_cli.core.recipe import load_recipe
from qlora_cli.train import trackers
from qlora_cli.train.trackers import tracker_environment, tracker_settings


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def needs(name: str):
    return pytest.mark.skipif(not installed(name), reason=f"{name} is not installed (pip install 'qlora-cli[{name}]')")


def write_recipe(folder, model_dir, report_to: list[str], **training):
    write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    text = tiny_recipe_text(model_dir, ["alpaca.jsonl"], report_to=report_to, **{"max_steps": 5, **training})
    path = folder / "tiny.yaml"
    path.write_text(text + "output:\n  dir: run\n")
    return path


def metrics(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_settings_default_to_the_run_directory_and_keep_what_the_user_set(tmp_path):
    run_dir = tmp_path / "run"
    settings = tracker_settings(run_dir, ["tensorboard", "mlflow", "wandb"], {"NETRC": str(tmp_path / "none")})
    assert settings["TENSORBOARD_LOGGING_DIR"] == str(run_dir / "tensorboard")
    assert settings["MLFLOW_TRACKING_URI"] == f"sqlite:///{run_dir / 'mlflow.db'}"
    assert settings["MLFLOW_EXPERIMENT_NAME"] == "run"
    assert (settings["WANDB_MODE"], settings["WANDB_DIR"]) == ("offline", str(run_dir))
    mine = {"MLFLOW_TRACKING_URI": "http://tracking:5000", "WANDB_MODE": "disabled", "WANDB_PROJECT": "p"}
    settings = tracker_settings(run_dir, ["mlflow", "wandb"], mine)
    assert settings["MLFLOW_TRACKING_URI"] == "http://tracking:5000"
    assert (settings["WANDB_MODE"], settings["WANDB_PROJECT"]) == ("disabled", "p")
    assert "TENSORBOARD_LOGGING_DIR" not in settings


def test_wandb_goes_online_only_with_credentials(tmp_path):
    netrc_file = tmp_path / "netrc"
    assert not trackers.wandb_logged_in({"NETRC": str(netrc_file)})
    assert trackers.wandb_logged_in({"WANDB_API_KEY": "k", "NETRC": str(netrc_file)})
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc_file.chmod(0o600)
    assert trackers.wandb_logged_in({"NETRC": str(netrc_file)})


def test_the_environment_is_restored_after_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    import os

    with tracker_environment(tmp_path / "run", ["tensorboard", "mlflow"]):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "run" / "tensorboard")
        assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "mine"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and os.environ["MLFLOW_EXPERIMENT_NAME"] == "mine"


def test_unknown_tracker_is_refused_at_its_line(tmp_path, tiny_model_dir):
    with pytest.raises(UserError) as caught:
        load_recipe(write_recipe(tmp_path, tiny_model_dir, ["comet"]))
    assert "training.report_to.0" in caught.value.render() and "tensorboard" in caught.value.render()


def test_a_missing_tracker_is_exit_2_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from qlora_cli.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a))
    loaded = []
    monkeypatch.setattr("qlora_cli.train.run.load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(write_recipe(tmp_path, tiny_model_dir, ["mlflow"]))])
    assert exit_.value.code == 2 and not loaded
    assert "pip install 'qlora-cli[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@needs("tensorboard")
@needs("mlflow")
def test_tensorboard_and_mlflow_scalars_equal_metrics_jsonl(tmp_path, tiny_model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qlora_cli.train.run import run_training

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, ["tensorboard", "mlflow"]))
    summary = run_training(recipe, console=Console(file=io.StringIO())).summary
    run_dir = tmp_path / "run"
    expected = metrics(run_dir)
    assert sorted(expected) == [1, 2, 3, 4, 5]

    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    logged = {event.step: event.value for event in board.Scalars("train/loss")}
    assert logged.keys() == expected.keys()
    assert all(logged[step] == pytest.approx(expected[step], rel=1e-6) for step in expected)  # stored as float32
    assert {"recipe", "summary"} <= {tag.split("/")[0] for tag in board.Tags()["tensors"]}

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(expected, rel=1e-12)
    params = run.data.params
    assert params["recipe.lora.r"] == "8" and params["recipe.training.max_steps"] == "5"
    assert float(params["summary.final_loss"]) == summary["final_loss"]
    assert params["summary.qlora_version"] == summary["qlora_version"]


@pytest.mark.slow
@needs("wandb")
def test_wandb_offline_writes_its_run_folder(tmp_path, tiny_model_dir, monkeypatch):
    from qlora_cli.train.run import run_training

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_training(load_recipe(write_recipe(tmp_path, tiny_model_dir, ["wandb"])), console=Console(file=io.StringIO()))
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log,) = folder.glob("*.wandb")
    assert log.stat().st_size > 0
