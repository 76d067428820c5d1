"""The paths only a GPU takes: its dtype choice, float16 with a gradient scaler, the paged optimizer, a real out of
memory, the model on this process's GPU, and FSDP asked for in one process. Skipped where torch sees no GPU."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console
from transformers import TrainerCallback

from qlora_cli.core.context import choose_compute_dtype
from qlora_cli.core.errors import RunFailure
from qlora_cli.core.recipe import load_recipe
from qlora_cli.train.run import finish, fit, run_training, setup

pytestmark = pytest.mark.gpu


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_auto_picks_bfloat16_where_the_gpu_has_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert choose_compute_dtype("auto", "cuda").dtype == expected


def test_float16_trains_with_a_gradient_scaler(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["quantization.compute_dtype=float16"])
    run = setup(recipe, console=quiet())
    result = fit(run)
    assert result.trainer.accelerator.scaler is not None
    summary = finish(run, result)
    assert summary["compute_dtype"] == "float16" and summary["device"] == "cuda"
    assert math.isfinite(summary["final_loss"])


def test_the_paged_optimizer_is_paged_on_the_gpu(tiny_recipe):
    run = setup(load_recipe(tiny_recipe, ["training.max_steps=1"]), console=quiet())
    result = fit(run)
    optimizer = getattr(result.trainer.optimizer, "optimizer", result.trainer.optimizer)
    assert getattr(optimizer, "is_paged", False), type(optimizer)


def test_the_model_trains_on_this_process_gpu(tiny_recipe, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    run = setup(load_recipe(tiny_recipe, ["training.max_steps=1"]), console=quiet())
    assert {parameter.device for parameter in run.model.parameters()} == {torch.device("cuda", 0)}


class MemoryCap(TrainerCallback):
    """Caps what the process may allocate to what it holds when training starts: the first step runs out."""

    def on_train_begin(self, args, state, control, **kwargs):
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(max(torch.cuda.memory_reserved() / total, 1e-6))


def test_a_real_out_of_memory_names_the_batch(tiny_recipe):
    run = setup(load_recipe(tiny_recipe), console=quiet())
    try:
        with pytest.raises(RunFailure, match=r"out of memory at step 1 on a batch of 2 x \d+ tokens"):
            fit(run, callbacks=[MemoryCap()])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_fsdp_in_one_process_trains_whole_and_says_so(tiny_recipe):
    output = io.StringIO()
    recipe = load_recipe(tiny_recipe, ["training.distributed=fsdp", "training.max_steps=2"])
    summary = run_training(recipe, console=Console(file=output, width=200)).summary
    assert summary["steps"] == 2 and summary["processes"] == 1
    assert "fsdp with one process has nothing to shard" in output.getvalue()
