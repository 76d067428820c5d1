"""The run directory: how a run is recognised and read back."""

from __future__ import annotations

import pytest

from qlora_cli.core.errors import UserError
from qlora_cli.core.rundir import is_run, is_run_dir, read_run_recipe


def test_runs_are_recognised_and_a_broken_recipe_is_named(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert not is_run(run_dir) and not is_run_dir(run_dir)
    (run_dir / "recipe.yaml").write_text("model: [unclosed\n")
    assert is_run(run_dir) and not is_run_dir(run_dir)
    (run_dir / "adapter").mkdir()
    assert is_run_dir(run_dir)
    with pytest.raises(UserError, match="recipe.yaml: not a readable run recipe"):
        read_run_recipe(run_dir)
