"""Experiment trackers (`training.report_to`): TensorBoard, MLflow and Weights & Biases, through the transformers
Trainer's own integrations, which log on rank 0 only. Each is configured here the way the integration reads its
settings, from the environment, for the time of the run:

- TensorBoard: event files in RUN_DIR/tensorboard (TENSORBOARD_LOGGING_DIR);
- MLflow: a local SQLite store, RUN_DIR/mlflow.db, unless MLFLOW_TRACKING_URI is set (then that server or
  store), in an experiment named after the run's folder unless MLFLOW_EXPERIMENT_NAME is set (MLflow 3 keeps its
  file store, ./mlruns, in maintenance mode and refuses it unless told otherwise);
- W&B: offline into RUN_DIR/wandb unless the user has logged in (WANDB_API_KEY, or `wandb login`'s netrc entry)
  or set WANDB_MODE; project `qlora` unless WANDB_PROJECT is set. Keys are only ever read from the environment.

Beside what the integrations log (the Trainer's arguments, the scalars), the resolved recipe is logged when
training begins and summary.json's figures when the run is finished.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from ..core.errors import UserError
from ..core.recipe import Recipe, flatten, to_yaml

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
WANDB_DIR = "wandb"
# The module each tracker's integration imports; the extra of pyproject.toml that installs it has the tracker's name.
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
MAX_PARAM_CHARS = 6000


def check_trackers_installed(names: list[str]) -> None:
    """Refuse, before anything loads, trackers whose library is not installed.

    Raises:
        UserError: naming each missing one and the extra that installs it.
    """
    missing = [name for name in names if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
    if missing:
        raise UserError([f"training.report_to: {name} is not installed: pip install 'qlora-cli[{name}]'"
                         for name in missing])


def wandb_logged_in(environ: dict[str, str]) -> bool:
    """Whether W&B has credentials: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc(environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def tracker_settings(run_dir: Path, names: list[str], environ: dict[str, str]) -> dict[str, str]:
    """The environment variables the integrations read, for this run: what the user set is kept."""
    settings: dict[str, str] = {}
    if "tensorboard" in names:
        settings["TENSORBOARD_LOGGING_DIR"] = str(run_dir / TENSORBOARD_DIR)
    if "mlflow" in names:
        settings["MLFLOW_TRACKING_URI"] = environ.get("MLFLOW_TRACKING_URI") or mlflow_store(run_dir)
        settings["MLFLOW_EXPERIMENT_NAME"] = environ.get("MLFLOW_EXPERIMENT_NAME") or run_dir.name
    if "wandb" in names:
        settings["WANDB_DIR"] = environ.get("WANDB_DIR") or str(run_dir)
        settings["WANDB_PROJECT"] = environ.get("WANDB_PROJECT") or "qlora"
        settings["WANDB_MODE"] = environ.get("WANDB_MODE") or ("online" if wandb_logged_in(environ) else "offline")
    return settings


def mlflow_store(run_dir: Path) -> str:
    """The run's own MLflow store, what `mlflow ui --backend-store-uri` takes."""
    return f"sqlite:///{run_dir / MLFLOW_DB}"


@contextmanager
def tracker_environment(run_dir: Path, names: list[str]) -> Iterator[dict[str, str]]:
    """The integrations' settings in the environment while the run trains; the environment as it was after."""
    settings = tracker_settings(run_dir, names, dict(os.environ))
    if "mlflow" in names:
        run_dir.mkdir(parents=True, exist_ok=True)
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flat_params(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    """Values as tracker parameters: one string per leaf, dotted keys under `prefix`."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_params(f"{prefix}{key}.", value))
        else:
            flat[f"{prefix}{key}"] = (value if isinstance(value, str) else json.dumps(value, default=str))[:MAX_PARAM_CHARS]
    return flat


def recipe_params(recipe: Recipe) -> dict[str, str]:
    # MLflow refuses parameter values over 6000 characters (a Jinja chat template can be longer)
    return {f"recipe.{key}": (value if isinstance(value, str) else json.dumps(value, default=str))[:MAX_PARAM_CHARS]
            for key, value, _ in flatten(recipe)}


class TrackerLog(TrainerCallback):
    """Logs the recipe to the trackers when training begins (after the integrations have started their runs:
    the Trainer calls them first), and remembers where, so that `log_summary` can add the run's summary once
    it is written."""

    def __init__(self, recipe: Recipe, names: list[str]):
        self.recipe, self.names = recipe, names
        self.mlflow_run: tuple[str, str] | None = None  # (tracking URI, run id)
        self.tensorboard_dir: str | None = None
        self.integrations: list = []  # the Trainer's callbacks, set by make_trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        params = recipe_params(self.recipe)
        if "tensorboard" in self.names:
            from transformers.integrations import TensorBoardCallback

            board = next(c for c in self.integrations if isinstance(c, TensorBoardCallback))
            self.tensorboard_dir = board.logging_dir
            board.tb_writer.add_text("recipe", f"```yaml\n{to_yaml(self.recipe)}```")
        if "mlflow" in self.names:
            import mlflow

            run = mlflow.active_run()
            self.mlflow_run = (mlflow.get_tracking_uri(), run.info.run_id)
            mlflow.log_params(params)
        if "wandb" in self.names:
            import wandb

            wandb.config.update(params, allow_val_change=True)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """summary.json's figures as parameters (W&B: the run's summary), then the trackers' runs closed."""
        params = flat_params("summary.", summary)
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=self.tensorboard_dir) as writer:
                writer.add_text("summary", f"```json\n{json.dumps(summary, indent=2)}\n```")
        if self.mlflow_run is not None:
            import mlflow

            uri, run_id = self.mlflow_run
            mlflow.set_tracking_uri(uri)
            with mlflow.start_run(run_id=run_id):
                mlflow.log_params(params)
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update(params)
                wandb.finish()
