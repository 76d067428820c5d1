"""What a merge needs, from the model's config: the figures and the refusal."""

from __future__ import annotations

import json

import pytest

from qlora_cli.core.errors import UserError
from qlora_cli.export.merge_plan import LIBRARIES_BYTES, MergeSettings, check_fits, merge_needs
from qlora_cli.plan.configs import shipped_config

GiB = 2**30


def config(hub_id: str) -> dict:
    return json.loads(shipped_config(hub_id).read_text())


def settings(**changes) -> MergeSettings:
    values = dict(bits=4, double_quant=True, lora_r=64, target_modules="all-linear", compute_bytes=2, out_bytes=2,
                  max_shard_bytes=10**9, prompt_tokens=512, on_gpu=False)
    return MergeSettings(**{**values, **changes})


def test_disk_is_the_merged_weights_and_the_gguf_files():
    needs = merge_needs(config("huggyllama/llama-7b"), settings())
    assert needs.parameters == 6_738_415_616  # LLaMA-7B
    assert needs.disk_bytes == 2 * needs.parameters
    assert merge_needs(config("huggyllama/llama-7b"), settings(out_bytes=4)).disk_bytes == 4 * needs.parameters
    with_gguf = merge_needs(config("huggyllama/llama-7b"), settings(gguf_types=("f16", "q8_0")))
    assert with_gguf.disk_bytes == needs.disk_bytes + 2 * needs.parameters + int(34 / 32 * needs.parameters)


def test_memory_does_not_grow_with_the_model_but_with_the_shard():
    small, large = merge_needs(config("huggyllama/llama-7b"), settings()), merge_needs(config("huggyllama/llama-65b"), settings())
    # A 65B model's 16-bit checkpoint is 130 GB; merging it needs a few GiB (mostly its LoRA r=64 adapter, 3 GiB).
    assert large.host_bytes < 8 * GiB and small.host_bytes < 4 * GiB
    bigger_shards = merge_needs(config("huggyllama/llama-7b"), settings(max_shard_bytes=5 * 10**9))
    assert bigger_shards.host_bytes - small.host_bytes == 4 * 10**9
    assert "one output shard 954 MiB" in small.describe()


def test_on_a_gpu_the_layers_are_there_and_the_shard_on_the_host():
    cpu = merge_needs(config("huggyllama/llama-65b"), settings())
    gpu = merge_needs(config("huggyllama/llama-65b"), settings(on_gpu=True))
    assert gpu.device_bytes is not None and cpu.device_bytes is None
    assert gpu.host_bytes < cpu.host_bytes and gpu.host_bytes > LIBRARIES_BYTES + 10**9
    assert "GPU memory" in gpu.describe()


def test_gguf_export_loads_the_merged_model_whole():
    needs = merge_needs(config("huggyllama/llama-7b"), settings(gguf_types=("f16",)))
    assert needs.host_bytes >= 8 * needs.parameters
    assert "GGUF export" in needs.describe()


def test_a_merge_that_does_not_fit_is_refused_with_the_figures():
    needs = merge_needs(config("huggyllama/llama-7b"), settings())
    check_fits(needs, host_available=needs.host_bytes, device_available=None, disk_free=2 * needs.disk_bytes, disk_folder="/x")
    with pytest.raises(UserError, match=r"needs about .* of memory .* only 1\.0 GiB of memory available"):
        check_fits(needs, host_available=GiB, device_available=None, disk_free=2 * needs.disk_bytes, disk_folder="/x")
    with pytest.raises(UserError, match=r"only 1\.0 GiB of disk free in /x"):
        check_fits(needs, host_available=needs.host_bytes, device_available=None, disk_free=GiB, disk_folder="/x")
    gpu = merge_needs(config("huggyllama/llama-7b"), settings(on_gpu=True))
    with pytest.raises(UserError, match="of GPU memory free"):
        check_fits(gpu, host_available=gpu.host_bytes, device_available=GiB // 2, disk_free=2 * gpu.disk_bytes, disk_folder="/x")


def test_an_adapted_tied_head_is_written_untied():
    smollm2 = config("smollm2-135m-instruct")
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tied = merge_needs(smollm2, settings(target_modules=linears))
    untied = merge_needs(smollm2, settings(target_modules=linears + ["lm_head"]))
    assert untied.parameters - tied.parameters == 49152 * 576  # the head gets a weight of its own
    assert untied.disk_bytes - tied.disk_bytes == 2 * 49152 * 576
