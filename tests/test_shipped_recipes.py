"""Every shipped recipe for a big model plans to fit the GPU its comment names (from config alone)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora_cli.cli import main
from qlora_cli.plan import plan_memory
from qlora_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "model_configs"
# Which config-only model each recipe's `model.base` stands for (the real configs' shapes).
MODELS = {
    "guanaco/7b.yaml": "llama-7b",
    "guanaco/13b.yaml": "llama-13b",
    "guanaco/33b.yaml": "llama-33b",
    "guanaco/65b.yaml": "llama-65b",
    "models/llama-3-8b-instruct.yaml": "llama-3-8b",
    "models/mistral-7b-instruct.yaml": "mistral-7b",
    "models/qwen2.5-7b-instruct.yaml": "qwen2.5-7b",
    "models/llama-3-70b-instruct.yaml": "llama-3-70b",
}


def test_every_big_model_recipe_is_listed():
    shipped = {str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").glob("*/*.yaml")} - {
        str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes" / "examples").glob("*.yaml")
    }
    assert shipped == set(MODELS)


@pytest.mark.parametrize("recipe_name", sorted(MODELS))
def test_recipe_fits_the_gpu_its_comment_names(recipe_name, tmp_path, capsys):
    path = REPO / "recipes" / recipe_name
    comment = next(line for line in path.read_text().splitlines() if line.startswith("# GPU:"))
    gib = int(re.search(r"fits one (\d+) GiB GPU", comment).group(1))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((CONFIGS / f"{MODELS[recipe_name]}.json").read_text())
    recipe = load_recipe(path)
    plan = plan_memory(json.loads((model_dir / "config.json").read_text()), recipe, gpu_memory_bytes=gib * 2**30)
    assert plan.fits
    # And through the command, from a directory holding nothing but config.json:
    main(["plan", str(path), "--config", str(model_dir), "--gpu-memory", f"{gib}GiB", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["fits"] is True and printed["total_bytes"] == plan.total_bytes
    fsdp = re.search(r"two (\d+) GiB GPUs", comment)
    if fsdp:
        sharded = plan_memory(json.loads((model_dir / "config.json").read_text()), recipe,
                              gpu_memory_bytes=int(fsdp.group(1)) * 2**30, gpus=2, sharded=True)
        assert sharded.fits


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
