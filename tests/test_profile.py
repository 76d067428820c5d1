"""`qlora train --profile [N]`: a trace, the top operations and where a step's time goes, in the run directory."""

from __future__ import annotations

import json

import pytest

from qlora_cli.cli import PROFILE_STEPS, main, with_profile_default
from qlora_cli.train.profile import PHASES, WARMUP_STEPS, phase_breakdown


def test_profile_without_a_number_takes_the_default():
    assert with_profile_default(["train", "r.yaml", "--profile"]) == ["train", "r.yaml", "--profile", str(PROFILE_STEPS)]
    assert with_profile_default(["train", "--profile", "--overwrite", "r.yaml"])[2] == str(PROFILE_STEPS)
    assert with_profile_default(["train", "r.yaml", "--profile", "3"]) == ["train", "r.yaml", "--profile", "3"]
    assert with_profile_default(["eval", "run", "--profile"]) == ["eval", "run", "--profile"]


def test_phases_add_up_to_the_step():
    phases = phase_breakdown(1.0, {"data": 0.1, "forward": 0.2, "training_step": 0.5, "optimizer": 0.15})
    assert phases == pytest.approx({"data": 0.1, "forward": 0.2, "backward": 0.3, "optimizer": 0.15, "other": 0.25})


def test_profiled_steps_are_written_into_the_run(tiny_recipe, capsys):
    main(["train", str(tiny_recipe), "--profile", "2", "--set", "training.max_steps=5"])
    out = capsys.readouterr().out
    folder = tiny_recipe.parent / "run" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["operations.txt", "steps.json", "summary.md", "trace.json"]

    report = json.loads((folder / "steps.json").read_text())
    assert [step["step"] for step in report["steps"]] == [WARMUP_STEPS + 1, WARMUP_STEPS + 2]
    for step in report["steps"]:
        assert set(step["phases"]) == set(PHASES) and step["tokens"] > 0
        assert sum(step["phases"].values()) == pytest.approx(step["seconds"], rel=1e-6)
        assert step["phases"]["forward"] > 0 and step["phases"]["backward"] > 0 and step["phases"]["optimizer"] > 0

    trace = json.loads((folder / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"qlora/data", "qlora/forward", "qlora/training_step"} <= names and "aten::mm" in names
    operations = (folder / "operations.txt").read_text()
    assert "aten::mm" in operations and "qlora/" not in operations
    assert "| backward |" in out and "ui.perfetto.dev" in out
    # Training went on to the end as usual.
    assert json.loads((tiny_recipe.parent / "run" / "summary.json").read_text())["steps"] == 5


def test_a_run_shorter_than_the_profile_writes_what_it_profiled(tiny_recipe, capsys):
    main(["train", str(tiny_recipe), "--profile", "--set", f"training.max_steps={WARMUP_STEPS + 1}"])
    report = json.loads((tiny_recipe.parent / "run" / "profile" / "steps.json").read_text())
    assert len(report["steps"]) == 1


def test_a_run_that_ends_in_its_warm_up_says_nothing_was_profiled(tiny_recipe, capsys):
    main(["train", str(tiny_recipe), "--profile", "--set", f"training.max_steps={WARMUP_STEPS}"])
    assert "nothing was profiled" in capsys.readouterr().out
    assert not (tiny_recipe.parent / "run" / "profile").exists()


def test_a_run_that_fails_stops_the_profiler_and_writes_what_it_profiled(tiny_recipe):
    import io

    import torch
    from rich.console import Console
    from transformers import TrainerCallback

    from qlora_cli.core.recipe import load_recipe
    from qlora_cli.train.run import fit, setup

    class FailAfterTheFirstProfiledStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS + 1:
                raise RuntimeError("a failure mid-run")

    run = setup(load_recipe(tiny_recipe, ["training.max_steps=6"]), console=Console(file=io.StringIO()))
    with pytest.raises(RuntimeError, match="a failure mid-run"):
        fit(run, callbacks=[FailAfterTheFirstProfiledStep()], profile_steps=3)
    assert not torch.autograd._profiler_enabled()
    report = json.loads((run.run_dir / "profile" / "steps.json").read_text())
    assert [step["step"] for step in report["steps"]] == [WARMUP_STEPS + 1]
