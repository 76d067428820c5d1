"""The run context: device, dtype and the process's place, decided once."""

from __future__ import annotations

import pytest
import torch

from qlora_cli.core.context import RunContext, choose_compute_dtype, run_context
from qlora_cli.core.errors import UserError


def test_each_rank_gets_its_own_gpu():
    assert RunContext("cuda", torch.bfloat16, local_rank=1, rank=3, world_size=4).device_map == {"": 1}
    assert RunContext("cpu", torch.float32, local_rank=1).device_map == {"": "cpu"}
    assert not RunContext("cuda", torch.bfloat16, rank=3).is_main and RunContext("cpu", torch.float32).is_main


def test_the_launch_environment_is_read(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr("qlora_cli.core.context.detect_device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    context = run_context("auto", "fsdp")
    assert (context.rank, context.local_rank, context.world_size, context.sharded) == (3, 1, 4, True)
    assert context.compute_dtype == torch.bfloat16 and context.device_map == {"": 1}
    assert not run_context("auto", "ddp").sharded
    assert not run_context("auto", "fsdp", processes=1).sharded  # one process: nothing to shard


def test_fsdp_and_float16_are_refused_on_cpu(monkeypatch):
    monkeypatch.setattr("qlora_cli.core.context.detect_device", lambda: "cpu")
    with pytest.raises(UserError, match="fsdp needs GPUs"):
        run_context("auto", "fsdp", processes=1)
    with pytest.raises(UserError, match="use float32 or auto"):
        run_context("float16", "ddp")


def test_gpus_without_bfloat16_get_float16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert choose_compute_dtype("auto", "cuda").dtype == torch.float16
