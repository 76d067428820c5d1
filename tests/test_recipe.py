"""The recipe schema and its errors: every problem at once, with file, line and key path."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_cli.cli import main
from qlora_cli.core.errors import UserError
from qlora_cli.core.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    for source in recipe.data.train:
        assert source.hub or source.path.is_file()


def test_shipped_recipes_exist():
    assert REPO / "recipes" / "quickstart.yaml" in SHIPPED


def write(tmp_path, text: str, data: bool = True) -> Path:
    if data:
        (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "model:\n  base: org/model\ndata:\n  train:\n    - path: train.jsonl\n"


def problems_of(path, overrides=()):
    with pytest.raises(UserError) as caught:
        load_recipe(path, list(overrides))
    return caught.value.problems


def test_paper_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert (recipe.quantization.bits, recipe.quantization.quant_type, recipe.quantization.double_quant) == (4, "nf4", True)
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.target_modules) == (64, 16, 0.05, "all-linear")
    t = recipe.training
    assert (t.optimizer, t.learning_rate, t.lr_scheduler, t.warmup, t.max_grad_norm) == ("paged_adamw_32bit", 2e-4, "constant", 0.03, 0.3)
    # The paper checkpoints always; `auto` checkpoints when the memory plan needs it (a 7B+ model on a GPU).
    assert t.gradient_checkpointing == "auto" and recipe.data.train_on_prompt is False
    assert t.seed == 0


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL + "output:\n  dir: out/run\n")
    monkeypatch.chdir("/")
    recipe = load_recipe(path)
    assert recipe.data.train[0].path == tmp_path / "train.jsonl"
    assert recipe.output.dir == tmp_path / "out" / "run"


def test_default_run_dir_is_runs_recipe_name_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.output.dir == tmp_path / "runs" / "recipe"


def test_typo_key_gets_did_you_mean_with_line(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  learning_rte: 1.0e-4\n")
    [problem] = problems_of(path)
    assert (problem.file, problem.line, problem.key) == (path, 7, "training.learning_rte")
    assert "did you mean `learning_rate`" in problem.message


def test_all_problems_reported_at_once(tmp_path):
    text = MINIMAL + "lora:\n  r: 0\n  dropout: high\ntraining:\n  batch_size: [1]\n  optimiser: adamw\n"
    problems = problems_of(write(tmp_path, text))
    by_key = {p.key: p for p in problems}
    assert set(by_key) == {"lora.r", "lora.dropout", "training.batch_size", "training.optimiser"}
    assert by_key["lora.r"].line == 7 and "greater than or equal to 1" in by_key["lora.r"].message
    assert by_key["lora.dropout"].line == 8 and "'high'" in by_key["lora.dropout"].message
    assert by_key["training.batch_size"].line == 10
    assert "did you mean `optimizer`" in by_key["training.optimiser"].message


def test_out_of_range_and_choices(tmp_path):
    text = MINIMAL + "quantization:\n  bits: 3\n  compute_dtype: float8\n"
    problems = {p.key: p for p in problems_of(write(tmp_path, text))}
    assert "4, 8 or 16" in problems["quantization.bits"].message
    assert "'auto', 'bfloat16', 'float16' or 'float32'" in problems["quantization.compute_dtype"].message


def test_missing_required_keys(tmp_path):
    problems = problems_of(write(tmp_path, "lora:\n  r: 8\n"))
    assert {p.key for p in problems} == {"model", "data"}
    assert all("required" in p.message for p in problems)


def test_missing_data_file_and_model_path(tmp_path):
    text = "model:\n  base: ./nowhere\ndata:\n  train:\n    - path: missing.jsonl\n"
    problems = {p.key: p for p in problems_of(write(tmp_path, text, data=False))}
    assert problems["data.train.0.path"].line == 5 and "not found" in problems["data.train.0.path"].message
    assert problems["model.base"].line == 2 and "not found" in problems["model.base"].message


def test_bad_yaml_names_the_line(tmp_path):
    [problem] = problems_of(write(tmp_path, MINIMAL + "training:\n  batch_size: [1\n"))
    assert problem.file.name == "recipe.yaml" and problem.line is not None and problem.line >= 7
    assert "not valid YAML" in problem.message


@pytest.mark.parametrize("text, line, hint", [
    ("model:\n  base: smollm2-135m-instruct\n data:\n  train: []\n", 3, "indentation"),
    ("model:\n\tbase: smollm2-135m-instruct\n", 2, "a tab indents this line"),
    ("lora:\n  target_modules: [q_proj, v_proj\ndata:\n  train: []\n", 2, "[ or { opened here is not closed"),
    ('model:\n  base: "smollm2\ndata: 1\n', 2, "a quote opened here is not closed"),
])
def test_yaml_syntax_errors_say_where_and_what_usually_causes_them(tmp_path, text, line, hint):
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(UserError) as error:
        load_recipe(tmp_path / "recipe.yaml")
    [problem] = error.value.problems
    assert problem.line == line and hint in problem.message, problem.render()


def test_duplicate_key_is_an_error(tmp_path):
    [problem] = problems_of(write(tmp_path, MINIMAL + "training:\n  seed: 1\n  seed: 2\n"))
    assert (problem.key, problem.line) == ("training.seed", 8)


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    [problem] = problems_of(write(tmp_path, MINIMAL + "training:\n  seed: !!python/object/apply:os.system ['true']\n"))
    assert "not valid YAML" in problem.message


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs" shape: each level a list of nine aliases of the level before (9**9 values in all)."""
    names = "abcdefghijklmnop"[:levels]
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{name}: &{name} [{', '.join([f'*{before}'] * 9)}]" for before, name in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_its_alias_before_anything_expands(tmp_path):
    path = write(tmp_path, MINIMAL + alias_bomb())
    # In a process of its own with 1 GiB of address space: expanding the aliases would need far more.
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
              "from qlora_cli.cli import main\n"
              "main(['validate', sys.argv[1]])\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    # Levels a-e expand to about 75,000 values; the first alias of level f (line 6 + 5 of MINIMAL) passes 100,000.
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{path}:11: this alias expands the recipe beyond 100,000 values" in result.stderr
    assert "Traceback" not in result.stderr


def test_alias_bomb_refusal_is_immediate(tmp_path):
    import time

    start = time.monotonic()
    [problem] = problems_of(write(tmp_path, MINIMAL + alias_bomb(12)))
    assert time.monotonic() - start < 1.0
    assert problem.line == 11 and "alias expands" in problem.message


def test_a_recipe_using_aliases_validates(tmp_path):
    text = MINIMAL + ("    - path: train.jsonl\n"
                      "      columns: &renames {output: answer}\n"
                      "    - path: train.jsonl\n"
                      "      columns: *renames\n"
                      "lora:\n"
                      "  target_modules: &attention [q_proj, v_proj]\n"
                      "x_shared: &shared\n"
                      "  r: 4\n")
    problems = {p.key: p for p in problems_of(write(tmp_path, text))}
    assert list(problems) == ["x_shared"] and problems["x_shared"].line == 12  # an unknown key, at its line
    recipe = load_recipe(write(tmp_path, text.replace("x_shared: &shared\n  r: 4\n", "")))
    assert [source.columns for source in recipe.data.train] == [{}, {"output": "answer"}, {"output": "answer"}]
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]


def test_an_alias_of_a_value_containing_it_is_refused(tmp_path):
    [problem] = problems_of(write(tmp_path, MINIMAL + "lora:\n  target_modules: &loop [q_proj, *loop]\n"))
    assert problem.line == 7 and "alias refers to a value that contains it" in problem.message


def test_quant_type_only_with_4_bits(tmp_path):
    [problem] = problems_of(write(tmp_path, MINIMAL + "quantization:\n  bits: 8\n  quant_type: fp4\n"))
    assert problem.key == "quantization.quant_type" and problem.line == 8


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                "training.gradient_checkpointing=false", "data.train.0.format=alpaca"])
    assert recipe.training.learning_rate == 1e-4
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.training.gradient_checkpointing is False
    assert recipe.data.train[0].format == "alpaca"


def test_set_errors_name_the_flag(tmp_path):
    path = write(tmp_path, MINIMAL)
    problems = problems_of(path, ["training.learning_rat=1", "training.batch_size=zero", "nonsense"])
    rendered = [p.render() for p in problems]
    assert any("--set" in r and "did you mean `learning_rate`" in r for r in rendered)
    assert any("--set training.batch_size" in r and "'zero'" in r for r in rendered)
    assert any("not KEY=VALUE" in r for r in rendered)


def test_schema_documents_every_field():
    def walk(model):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type) and hasattr(a, "model_fields")]
            if nested:
                walk(nested[0])
            else:
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(Recipe)


# --- through the command line -------------------------------------------------------------------

def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    return exited.value.code, capsys.readouterr()


def test_cli_exit_2_with_location_and_no_traceback(tmp_path, capsys):
    path = write(tmp_path, MINIMAL + "training:\n  learning_rte: 1\n")
    code, output = run_cli(["validate", str(path)], capsys)
    assert code == 2
    assert f"{path}:7: training.learning_rte: unknown key (did you mean `learning_rate`?)" in output.err
    assert "Traceback" not in output.err + output.out


def test_cli_validate_prints_resolved_recipe(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    main(["validate", str(path), "--set", "training.max_steps=7"])
    out = capsys.readouterr().out
    assert "training.max_steps" in out and "7" in out and "valid" in out


def test_cli_unknown_flag_is_exit_2(tmp_path, capsys):
    code, output = run_cli(["validate", str(write(tmp_path, MINIMAL)), "--bogus"], capsys)
    assert code == 2 and "--bogus" in output.err


def test_validate_and_help_do_not_import_torch(tmp_path):
    path = write(tmp_path, MINIMAL)
    probe = (
        "import sys\nfrom qlora_cli.cli import main\n"
        f"main(['validate', {str(path)!r}])\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_shows_a_value_only_where_an_option_takes_one():
    result = subprocess.run([sys.executable, "-m", "qlora_cli", "train", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0
    assert "<bool>" not in result.stdout and "--overwrite" in result.stdout and "KEY=VALUE" in result.stdout


def test_console_script_reports_errors_without_traceback(tmp_path):
    path = write(tmp_path, MINIMAL + "lora:\n  r: -1\n")
    result = subprocess.run([sys.executable, "-m", "qlora_cli", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "lora.r" in result.stderr and ":7:" in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_recipe_reference_is_current():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_reference.py"), "--check"])
    assert result.returncode == 0, "README.md's recipe reference is stale: run python scripts/recipe_reference.py"


def test_names_from_other_tools_get_our_key_suggested(tmp_path):
    text = MINIMAL.replace("data:\n", "lora:\n  rank: 8\ndata:\n") + "training:\n  num_train_epochs: 3\n"
    problems = {p.key: p.message for p in problems_of(write(tmp_path, text))}
    assert "did you mean `r`" in problems["lora.rank"]
    assert "did you mean `epochs`" in problems["training.num_train_epochs"]


def test_version_is_the_installed_distributions_and_imports_no_torch():
    probe = (
        "import sys\nfrom qlora_cli.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as exit_:\n    assert exit_.code in (0, None), exit_.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"qlora {importlib.metadata.version('qlora-cli')}"


def test_shell_completion_completes_commands():
    env = {**os.environ, "_QLORA_COMPLETE": "complete_bash", "COMP_WORDS": "qlora me", "COMP_CWORD": "1"}
    script = Path(sys.executable).parent / "qlora"  # the installed console script, whose name completion keys on
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["merge"], (result.stdout, result.stderr)
