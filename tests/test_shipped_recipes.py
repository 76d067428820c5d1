"""Every shipped recipe for a big model plans to fit the GPU its comment names (from config alone)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora_cli.cli import main
from qlora_cli.plan.configs import read_model_config, shipped_config
from qlora_cli.plan.memory import plan_memory
from qlora_cli.core.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
# The hub model each big-model recipe trains; qlora ships its config.json, so plans need no network.
MODELS = {
    "guanaco/7b.yaml": "huggyllama/llama-7b",
    "guanaco/13b.yaml": "huggyllama/llama-13b",
    "guanaco/33b.yaml": "huggyllama/llama-30b",
    "guanaco/65b.yaml": "huggyllama/llama-65b",
    "models/llama-3-8b-instruct.yaml": "meta-llama/Meta-Llama-3-8B-Instruct",
    "models/mistral-7b-instruct.yaml": "mistralai/Mistral-7B-Instruct-v0.3",
    "models/qwen2.5-7b-instruct.yaml": "Qwen/Qwen2.5-7B-Instruct",
    "models/llama-3-70b-instruct.yaml": "meta-llama/Llama-3.3-70B-Instruct",
    "dpo/zephyr-7b.yaml": "mistralai/Mistral-7B-Instruct-v0.3",
}


def test_every_big_model_recipe_is_listed():
    shipped = {str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").glob("*/*.yaml")} - {
        str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes" / "examples").glob("*.yaml")
    } - {  # the bundled model's demos (dpo/, orpo/, kto/)
        str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").glob("*/quickstart.yaml")
    }
    assert shipped == set(MODELS)


@pytest.mark.parametrize("recipe_name", sorted(MODELS))
def test_recipe_fits_the_gpu_its_comment_names(recipe_name, tmp_path, capsys):
    path = REPO / "recipes" / recipe_name
    comment = next(line for line in path.read_text().splitlines() if line.startswith("# GPU:"))
    gib = int(re.search(r"fits one (\d+) GiB GPU", comment).group(1))
    recipe = load_recipe(path)
    assert recipe.model.base == MODELS[recipe_name]
    config = json.loads(shipped_config(recipe.model.base).read_text())
    plan = plan_memory(config, recipe, gpu_memory_bytes=gib * 2**30)
    assert plan.fits
    # And through the command, offline (the tests run with HF_HUB_OFFLINE=1), from the shipped config:
    main(["plan", str(path), "--gpu-memory", f"{gib}GiB", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["fits"] is True and printed["total_bytes"] == plan.total_bytes
    # Or from a directory holding nothing but config.json:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    main(["plan", str(path), "--config", str(model_dir), "--gpu-memory", f"{gib}GiB", "--json"])
    assert json.loads(capsys.readouterr().out)["total_bytes"] == plan.total_bytes
    fsdp = re.search(r"two (\d+) GiB GPUs", comment)
    if fsdp:
        sharded = plan_memory(config, recipe, gpu_memory_bytes=int(fsdp.group(1)) * 2**30, gpus=2, sharded=True)
        assert sharded.fits


@pytest.mark.parametrize("recipe_path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_plans_offline(recipe_path, capsys):
    main(["plan", str(recipe_path), "--json"])
    assert json.loads(capsys.readouterr().out)["resident_bytes"] > 0


def test_a_model_nobody_knows_names_the_config_flag(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    recipe.write_text("model:\n  base: nobody/unknown-model\ndata:\n  train:\n    - path: d.jsonl\n")
    with pytest.raises(SystemExit) as exited:
        main(["plan", str(recipe)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--config" in err and "nobody/unknown-model" in err


def test_shipped_configs_read_as_model_configs():
    for name in [*MODELS.values(), "smollm2-135m-instruct"]:
        assert read_model_config(shipped_config(name))["hidden_size"] > 0


def test_guanaco_recipes_carry_the_papers_settings():
    for size, lr, dropout in (("7b", 2e-4, 0.1), ("13b", 2e-4, 0.1), ("33b", 1e-4, 0.05), ("65b", 1e-4, 0.05)):
        recipe = load_recipe(REPO / "recipes" / "guanaco" / f"{size}.yaml")
        assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (64, 16, dropout)
        assert recipe.training.learning_rate == lr and recipe.training.max_steps == 1875
        assert recipe.training.batch_size * recipe.training.gradient_accumulation_steps == 16
        assert (recipe.training.lr_scheduler, recipe.training.warmup, recipe.training.max_grad_norm) == ("constant", 0.03, 0.3)
        assert recipe.training.optimizer == "paged_adamw_32bit" and recipe.training.seed == 0
        assert recipe.data.max_seq_len == 512 and recipe.data.group_by_length and recipe.data.train_on_prompt
        assert recipe.data.train[0].format == "oasst" and recipe.data.template == "guanaco"
