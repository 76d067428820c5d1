"""Training on a CPU: the compute dtype `auto` picks, the allocator setting, and the cheap LoRA dropout."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from rich.console import Console

from qlora_cli.core import cpu
from qlora_cli.core.context import choose_compute_dtype
from qlora_cli.core.recipe import load_recipe
from qlora_cli.train.run import run_training


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_uses_bfloat16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    monkeypatch.setattr("qlora_cli.core.context.cpu_has_native_bfloat16", lambda: native)
    assert choose_compute_dtype("auto", "cpu").dtype == expected
    assert choose_compute_dtype("float32", "cpu").dtype == torch.float32  # an explicit choice is kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_allocator_accepts_the_settings():
    assert cpu.keep_freed_memory() is True


FREED_AND_RETAINED = """
import sys, torch
from qlora_cli.core import cpu

def resident():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024

getattr(cpu, sys.argv[1], lambda: None)()
warm = torch.ones(2**22)
del warm  # a freed 16 MiB block: glibc's default then serves blocks of that size from its heap
start = resident()
blocks, pins = [], []
for _ in range(32):  # 8 MiB blocks, each with a small tensor allocated after it that stays
    blocks.append(torch.ones(2**21))
    pins.append(torch.ones(2**14))
del blocks
print(resident() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_a_merge_gives_freed_memory_back_where_glibc_keeps_it():
    import subprocess

    def retained(setting: str) -> int:  # in a fresh process: the allocator's state is the process's history
        result = subprocess.run([sys.executable, "-c", FREED_AND_RETAINED, setting], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.split()[-1])

    assert retained("glibc's default") > 128 * 2**20  # keep_freed_memory keeps even more on purpose
    assert retained("return_freed_memory") < 16 * 2**20


def test_cheap_dropout_keeps_one_minus_p_and_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(1000, 1001)  # not a multiple of 4 elements per draw
    y = cpu.cheap_dropout(x, 0.1)
    kept = y > 0
    assert y.shape == x.shape and y.dtype == x.dtype
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    # Every element of a 64-bit draw is random, the one holding its always-zero top bit included.
    for quarter in range(4):
        assert abs(kept.flatten()[: 1000 * 1000].view(-1, 4)[:, quarter].float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.tensor(2**15 / (2**15 - round(0.1 * 2**15))))
    assert abs(y.mean().item() - 1.0) < 0.003
    torch.manual_seed(0)
    assert torch.equal(cpu.cheap_dropout(x, 0.1), y)  # seeded like the rest of training


def test_lora_dropout_is_replaced_and_still_drops(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear"))
    assert cpu.use_cheap_lora_dropout(model) == 2 * 7
    dropout = model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"]
    x = torch.ones(64, 64)
    model.train()
    assert 0.75 < (dropout(x) > 0).float().mean().item() < 0.85
    model.eval()
    assert torch.equal(dropout(x), x)


def test_bfloat16_training_follows_the_float32_run(tiny_recipe):
    from test_train import GOLDEN_LOSSES

    recipe = load_recipe(tiny_recipe, ["quantization.compute_dtype=bfloat16"])
    run = run_training(recipe, console=Console(file=io.StringIO(), width=120))
    summary = run.summary
    assert summary["compute_dtype"] == "bfloat16"
    records = [json.loads(line) for line in (tiny_recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(GOLDEN_LOSSES, rel=2e-2)
