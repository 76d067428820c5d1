"""Every use of a library internal (qlora_cli/core/compat.py) works with the installed libraries, and fails loudly,
by name, when the internal is gone."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch

from qlora_cli.core import compat
from qlora_cli.core.compat import LibraryChanged
from qlora_cli.data.named_templates import NAMED_TEMPLATES


def test_library_versions_name_what_decides_training():
    versions = compat.library_versions()
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "accelerate"} <= set(versions)
    assert versions["torch"].startswith(torch.__version__.split("+")[0])


def test_native_bfloat16_check(monkeypatch):
    assert isinstance(compat.cpu_has_native_bfloat16(), bool)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    with pytest.raises(LibraryChanged, match="_is_avx512_bf16_supported"):
        compat.cpu_has_native_bfloat16()


def test_profiler_memory_events_see_an_allocation():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        tensor = torch.empty(1 << 20, dtype=torch.uint8, device="cpu")
        del tensor
    sizes = [event.nbytes() for event in compat.profiler_memory_events(profiler)]
    assert 1 << 20 in sizes and -(1 << 20) in sizes

    class Finished:
        profiler = None

    with pytest.raises(LibraryChanged, match="kineto_results"):
        compat.profiler_memory_events(Finished())


class NotSliced(torch.nn.Module):
    """A causal LM of its own making: it does not narrow its hidden states with transformers' helper."""

    def forward(self, input_ids, logits_to_keep=0):
        return input_ids


def test_a_model_without_transformers_slicing_is_not_sliceable(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    assert compat.output_projection_is_sliceable(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert not compat.output_projection_is_sliceable(NotSliced())


def test_projection_skipped_restores_the_head_and_refuses_a_nested_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = model.lm_head
    with compat.output_projection_skipped(model, head):
        assert isinstance(model.lm_head, torch.nn.Identity)
    assert model.lm_head is head
    with pytest.raises(LibraryChanged, match="direct children"):
        with compat.output_projection_skipped(model, model.model.norm):
            pass


def test_kept_hidden_states_must_have_one_row_per_position():
    compat.check_kept_hidden_states(torch.zeros(5, 8), 5, 8)
    with pytest.raises(LibraryChanged, match=r"\(2, 5, 8\)"):
        compat.check_kept_hidden_states(torch.zeros(2, 5, 8), 5, 8)


def small_trainer(tiny_model_dir, tmp_path, rows):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from qlora_cli.data.tokenize import PadToLongest

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none",
                             remove_unused_columns=False)
    return Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=rows,
                   data_collator=PadToLongest(0))


def test_install_train_sampler_decides_the_training_order(tiny_model_dir, tmp_path):
    rows = [{"input_ids": [1] * (n + 1), "labels": [1] * (n + 1)} for n in range(6)]
    trainer = small_trainer(tiny_model_dir, tmp_path, rows)
    seen = []

    def reversed_order(dataset):
        seen.append(dataset)
        return list(reversed(range(len(dataset))))

    compat.install_train_sampler(trainer, reversed_order)
    loader = trainer.get_train_dataloader()
    first = next(iter(loader))
    assert seen and seen[0] is rows
    assert first["input_ids"].shape[-1] == 6  # the longest row, drawn first


def test_install_train_sampler_refuses_a_trainer_without_the_hook():
    class NoHook:
        pass

    with pytest.raises(LibraryChanged, match="_get_train_sampler"):
        compat.install_train_sampler(NoHook(), lambda dataset: [])


def test_length_grouped_indices_put_the_longest_batch_first_and_follow_the_generator():
    lengths = [3, 9, 1, 7, 5, 2, 8, 4]
    first = compat.length_grouped_indices(lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(first) == list(range(len(lengths)))
    assert lengths[first[0]] == max(lengths)
    assert compat.length_grouped_indices(lengths, 2, torch.Generator().manual_seed(0)) == first


def test_time_batch_fetching_marks_each_step_before_its_batches(tiny_model_dir, tmp_path):
    import contextlib

    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]} for _ in range(4)]
    trainer = small_trainer(tiny_model_dir, tmp_path, rows)
    events = []

    @contextlib.contextmanager
    def phase():
        events.append("fetch")
        yield

    compat.time_batch_fetching(trainer, lambda step: events.append(f"step {step}"), phase)
    loader = iter(trainer.get_train_dataloader())
    batches, _ = trainer.get_batch_samples(loader, 2, trainer.args.device)
    assert len(batches) == 2 and events == ["step 1", "fetch"]

    class Other:
        def get_batch_samples(self, iterator, count):
            return []

    with pytest.raises(LibraryChanged, match="get_batch_samples"):
        compat.time_batch_fetching(Other(), print, contextlib.nullcontext)


def test_tensor_version_counts_in_place_changes():
    weight = torch.zeros(3)
    before = compat.tensor_version(weight)
    weight.add_(1)
    assert compat.tensor_version(weight) > before
    with pytest.raises(LibraryChanged, match="_version"):
        compat.tensor_version(object())


def test_trainer_loss_scale(tiny_model_dir, tmp_path):
    trainer = small_trainer(tiny_model_dir, tmp_path, [])
    assert compat.trainer_loss_scale(trainer, None) == 1
    assert compat.trainer_loss_scale(trainer, torch.tensor(10)) == trainer.accelerator.num_processes
    with pytest.raises(LibraryChanged, match="model_accepts_loss_kwargs"):
        compat.trainer_loss_scale(object(), None)


def test_lora_dropouts_are_replaced_by_modules_that_then_run(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    assert compat.replace_lora_dropouts(model, lambda dropout: None) == 0  # None keeps each one
    seen = []

    class Watched(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    assert compat.replace_lora_dropouts(model, lambda dropout: Watched()) == 2 * 7
    model.train()
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(seen) == 2 * 7  # every adapter's input went through the module put in its place
    with pytest.raises(LibraryChanged, match="Watched, not torch.nn.Dropout"):
        compat.replace_lora_dropouts(model, lambda dropout: None)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_dropout = torch.nn.Dropout(0.1)
    with pytest.raises(LibraryChanged, match="ModuleDict"):
        compat.replace_lora_dropouts(model, lambda dropout: None)


class Stack(torch.nn.Module):
    """Three layers called in turn as modules, or (`bypass`) used without calling them."""

    def __init__(self, bypass: bool = False):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        self.bypass = bypass

    def forward(self, x):
        for layer in self.layers:
            x = x @ layer.weight.T if self.bypass else layer(x)
        return x


def test_forwards_replaced_runs_the_replacements_and_restores_the_layers():
    stack = Stack()
    with compat.forwards_replaced(stack.layers, lambda index: lambda x: x + index):
        assert torch.equal(stack(torch.zeros(2)), torch.full((2,), 3.0))
    assert not any("forward" in vars(layer) for layer in stack.layers)
    assert not torch.equal(stack(torch.zeros(2)), torch.full((2,), 3.0))  # each layer's own forward again
    with pytest.raises(KeyError):
        with compat.forwards_replaced(stack.layers, lambda index: lambda x: x):
            raise KeyError("inside")
    assert not any("forward" in vars(layer) for layer in stack.layers)


def test_forwards_replaced_refuses_a_model_that_does_not_call_its_layers():
    bypass = Stack(bypass=True)
    with pytest.raises(LibraryChanged, match=r"did not call the forward of its layer\(s\) \[0, 1, 2\]"):
        with compat.forwards_replaced(bypass.layers, lambda index: lambda x: x):
            bypass(torch.zeros(2))
    assert not any("forward" in vars(layer) for layer in bypass.layers)


def test_profiler_table_lists_only_the_kept_operations():
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        torch.mm(a, a)
        torch.add(a, a)
    table = compat.profiler_table(profiler.key_averages(), lambda event: event.key != "aten::add",
                                  sort_by="self_cpu_time_total", row_limit=10)
    assert "aten::mm" in table and "aten::add" not in table
    with pytest.raises(LibraryChanged, match="EventList"):
        compat.profiler_table(list(profiler.key_averages()), lambda event: True, sort_by="self_cpu_time_total",
                              row_limit=10)


def test_save_remote_code_copies_the_model_code_and_names_it(tmp_path, monkeypatch):
    import importlib

    from transformers import dynamic_module_utils

    source = tmp_path / "source"
    source.mkdir()
    (source / "modeling_qlora_compat_test.py").write_text(
        "class TinyModel:\n    _auto_class = 'AutoModelForCausalLM'\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(source))
    monkeypatch.delitem(sys.modules, "modeling_qlora_compat_test", raising=False)
    module = importlib.import_module("modeling_qlora_compat_test")
    out, config = tmp_path / "out", {}
    out.mkdir()
    compat.save_remote_code(module.TinyModel(), out, config)
    assert (out / "modeling_qlora_compat_test.py").is_file()
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_qlora_compat_test.TinyModel"}
    monkeypatch.setattr(dynamic_module_utils, "custom_object_save", lambda model, path: None)
    with pytest.raises(LibraryChanged, match="custom_object_save"):
        compat.save_remote_code(module.TinyModel(), out, config)


def test_quantized_weights_are_told_by_their_bitsandbytes_class_and_count_what_they_pack():
    import bitsandbytes as bnb

    weight = torch.randn(64, 32)
    four = bnb.nn.Linear4bit(32, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").weight
    four = compat.quantize_like_transformers(weight, four, "cpu")
    eight = bnb.nn.Linear8bitLt(32, 64, bias=False, has_fp16_weights=False).weight
    eight = compat.quantize_like_transformers(weight, eight, "cpu")
    plain = torch.nn.Parameter(weight)
    assert [compat.is_4bit_weight(p) for p in (four, eight, plain)] == [True, False, False]
    assert [compat.is_quantized_weight(p) for p in (four, eight, plain)] == [True, True, False]
    assert four.numel() == 64 * 32 // 2  # two 4-bit weights per byte
    assert [compat.weights_in(p) for p in (four, eight, plain)] == [64 * 32] * 3
    # FSDP stores the packed bytes in the compute dtype (bnb_4bit_quant_storage): four weights per bfloat16 element.
    stored = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    assert stored.numel() == 64 * 32 // 4 and compat.weights_in(stored) == 64 * 32
    unpacked = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")  # not quantized until moved
    assert compat.weights_in(unpacked) == 64 * 32


def test_keep_4bit_training_kernels(tiny_model_dir):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, device_map={"": "cpu"})
    compat.keep_4bit_training_kernels(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    del layers[0].support_avx512bf16_for_cpu
    with pytest.raises(LibraryChanged, match="support_avx512bf16_for_cpu"):
        compat.keep_4bit_training_kernels(model)


def test_bitsandbytes_kernel_fetch_is_quiet():
    compat.quiet_bitsandbytes_kernel_fetch()
    assert logging.getLogger(compat.BITSANDBYTES_CPU_KERNEL_LOGGER).level == logging.ERROR


def test_building_a_peft_model_is_quiet_about_peft_own_deprecated_read(tiny_model_dir, tmp_path, recwarn):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    with compat.peft_reading_deprecated_flags():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    with compat.peft_reading_deprecated_flags():
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    from peft.tuners.lora import LoraLayer

    assert sum(isinstance(module, LoraLayer) for module in model.modules()) == 14
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


def test_quantize_like_transformers_knows_only_bitsandbytes_parameters():
    import bitsandbytes as bnb

    weight = torch.randn(64, 64)
    placeholder = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").weight
    quantized = compat.quantize_like_transformers(weight, placeholder, "cpu")
    assert quantized.bnb_quantized and quantized.dtype == torch.uint8 and quantized.quant_state.dtype == torch.float32
    with pytest.raises(LibraryChanged, match="Parameter is not a bitsandbytes parameter"):
        compat.quantize_like_transformers(weight, torch.nn.Parameter(weight), "cpu")


def test_8bit_weights_dequantize_before_and_after_their_first_forward():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    original = torch.randn(32, 64)
    layer.weight = compat.quantize_like_transformers(original, layer.weight, "cpu")
    before = compat.dequantize_8bit(layer.weight)
    # Row-wise absmax int8: each weight within half a step (row max / 127 / 2) of the original, and float16 rounding.
    step = original.abs().amax(dim=1, keepdim=True) / 127
    assert ((before - original).abs() <= step / 2 + 1e-3 * original.abs() + 1e-6).all()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer.weight.SCB is None and layer.state.SCB is not None  # the first forward moved the row scales
    assert torch.equal(compat.dequantize_8bit(layer.weight, layer.state), before)
    compat.forget_quantization_state(layer)
    assert layer.state.SCB is None and layer.state.CB is None


def test_forget_quantization_state_of_a_4bit_layer():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = compat.quantize_like_transformers(torch.randn(64, 64), layer.weight, "cpu")
    assert layer.quant_state is not None
    compat.forget_quantization_state(layer)
    assert layer.quant_state is None
    del layer.quant_state
    with pytest.raises(LibraryChanged, match="quant_state"):
        compat.forget_quantization_state(layer)


def test_the_cache_goes_from_one_forward_to_the_next(tiny_model_dir, recwarn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        whole = model(input_ids=ids).logits[0, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], use_cache=True, **compat.cache_of(model, first)).logits[0, -1]
    assert torch.allclose(whole, step, atol=1e-5)
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


def test_a_4bit_weight_quantized_from_bfloat16_dequantizes_as_a_float32_layer_computes_with_it():
    """A weight quantized from bfloat16 (a run trained in it) has a bfloat16 quant state; a Linear4bit computing
    in float32 multiplies by its float32 dequantization, not by the bfloat16 one."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    placeholder = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").weight
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    compat.keep_4bit_training_kernels(torch.nn.Sequential(layer))
    layer.weight = compat.quantize_like_transformers(torch.randn(64, 128, dtype=torch.bfloat16), placeholder, "cpu")
    weight = compat.dequantize_4bit_in_float32(layer.weight)
    rounded = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert weight.dtype == torch.float32 and rounded.dtype == torch.bfloat16 and not torch.equal(weight, rounded.float())
    inputs = torch.randn(5, 128)
    with torch.no_grad():
        output = layer(inputs)
    assert (output - inputs @ weight.t()).abs().max() < 1e-5
    assert (output - inputs @ rounded.float().t()).abs().max() > 1e-3
    assert layer.weight.quant_state.dtype == torch.bfloat16  # the layer's own state is left as it was
    layer.weight.quant_state = None
    with pytest.raises(LibraryChanged, match="quant_state"):
        compat.dequantize_4bit_in_float32(layer.weight)


LOAD_A_4BIT_MODEL = """
import sys
import warnings
{quiet}
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=quant, device_map={{"": "cpu"}})
with torch.no_grad():
    model(input_ids=torch.tensor([[1, 2, 3]]))
"""


@pytest.mark.slow
def test_a_4bit_load_prints_no_library_line_once_quieted(tiny_model_dir):
    """bitsandbytes logs its failed kernel fetch while it is imported (on CPUs with AVX512-BF16), transformers
    draws its "Loading weights" bar: both gone in a process that imported qlora_cli first, as every qlora
    command (and every rank under torchrun) does."""
    import os
    import subprocess
    import sys

    from bitsandbytes.functional import has_avx512bf16

    def stderr_of(quiet: str) -> str:
        env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
        result = subprocess.run([sys.executable, "-c", LOAD_A_4BIT_MODEL.format(quiet=quiet), str(tiny_model_dir)],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    loud = stderr_of("")
    # As qlora runs: importing qlora_cli quiets bitsandbytes; every command calls quiet_libraries before loading.
    quiet = stderr_of("import qlora_cli.core.models as models; models.quiet_libraries(interactive=True)")
    # The kernel line is bitsandbytes' own on CPUs with AVX512-BF16 (this is what is silenced), never elsewhere.
    assert (compat.BITSANDBYTES_CPU_KERNEL_MESSAGE in loud) == has_avx512bf16()
    assert "Loading weights" in loud
    assert compat.BITSANDBYTES_CPU_KERNEL_MESSAGE not in quiet and "Loading weights" not in quiet


def test_transformers_bars_go_and_the_hubs_download_bars_stay():
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    try:
        hf_logging.enable_progress_bar()
        compat.transformers_bars_off()
        assert not hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()


def test_accelerates_thread_notice_is_filtered_by_its_own_words():
    import inspect

    import accelerate.state

    assert compat.ACCELERATE_THREADS_MESSAGE in inspect.getsource(accelerate.state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.quiet_library_noise()
        warnings.warn("OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at 2 to improve oob performance.")
        warnings.warn("a warning of another kind")
    assert [str(warning.message) for warning in caught] == ["a warning of another kind"]


def test_dora_and_saved_modules_on_a_meta_skeleton_get_storage_and_the_adapters_values(tmp_path, tiny_model_dir):
    """compat.dora_magnitudes_left_to_load and load_adapter_onto_skeleton, checked with peft 0.21.2: a DoRA adapter
    with modules_to_save, saved from a real model, loads onto a 4-bit skeleton on the meta device value for value."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"])
    real = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    with torch.no_grad():
        for name, parameter in real.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    real.save_pretrained(tmp_path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    with compat.dora_magnitudes_left_to_load():
        loaded = PeftModel(skeleton, PeftConfig.from_pretrained(tmp_path), low_cpu_mem_usage=True)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert "lora_magnitude_vector" in layer.adapter_layer_names
    assert layer.lora_magnitude_vector["default"].weight.device.type == "meta"
    compat.load_adapter_onto_skeleton(loaded, tmp_path, torch.device("cpu"))
    expected = dict(real.named_parameters())
    for name, parameter in loaded.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            assert torch.equal(parameter, expected[name]), name


def test_a_mean_loss_per_micro_batch_is_divided_by_the_accumulation_steps(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert trainer.model_accepts_loss_kwargs  # so the Trainer would take the loss as already scaled
    compat.loss_is_a_mean_per_micro_batch(trainer)
    assert trainer.loss_is_scaled_for_ga is False
    with pytest.raises(LibraryChanged):
        compat.loss_is_a_mean_per_micro_batch(object())


def test_switching_to_a_frozen_adapter_and_back_keeps_only_the_trained_one_trainable(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    model.save_pretrained(tmp_path / "adapter")
    model.load_adapter(tmp_path / "adapter", adapter_name="reference", is_trainable=False)

    def trainable(name):
        return {p.requires_grad for n, p in model.named_parameters() if f".{name}." in n}

    ids = torch.tensor([[1, 5, 6, 7]])
    before = model(ids).logits
    with compat.peft_adapter_switched(model, "reference", "default"):
        assert model.active_adapter == "reference" and trainable("reference") == {False} == trainable("default")
        same = model(ids).logits  # the reference is a copy of the adapter: same outputs
    assert torch.allclose(before, same)
    assert model.active_adapter == "default" and trainable("default") == {True} and trainable("reference") == {False}


def test_a_batch_cache_is_built_from_tensors_and_read_back(tiny_model_dir, recwarn):
    """What continuous batching relies on: a cache filled from per-layer tensors, read back after a forward,
    for a plain model and for a peft model (whose forward hides the cache keyword)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with compat.peft_reading_deprecated_flags():
        wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                 LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    for model in (plain, wrapped):
        dense = []  # what the output embedding reads: a strided view would make matmul copy its weight
        hook = model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: dense.append(args[0].stride() == torch.empty(args[0].shape).stride()))
        with torch.no_grad():
            whole = model(input_ids=ids).logits[0, -1]
            first = model(input_ids=ids[:, :-1], use_cache=True, **compat.batch_cache_arguments(model, [], 4))
            assert first.logits.shape[1] == 1  # the last position's only
            assert torch.allclose(model(input_ids=ids[:, :-1]).logits[0, -1], first.logits[0, -1], atol=1e-5)
            layers = compat.cache_tensors(first)
            assert len(layers) == 2 and layers[0][0].shape[:3] == (1, 2, 4)  # rows, kv heads, tokens
            step = model(input_ids=ids[:, -1:], use_cache=True, **compat.batch_cache_arguments(model, layers))
        assert step.logits.shape[1] == 1  # logits_to_keep: the last position only
        assert torch.allclose(whole, step.logits[0, -1], atol=1e-5)
        assert compat.cache_tensors(step)[0][0].shape[2] == 5
        hook.remove()
        assert all(dense)  # the prefill's last position and the step's, not views into all positions
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]  # the keyword this version wants

    class Outputs:
        cache = type("Cache", (), {"layers": [object()]})()

    with pytest.raises(LibraryChanged, match="full-attention cache layers"):
        compat.cache_tensors(Outputs())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_custom_attention_mask_reaches_the_attention_as_the_only_mask(tiny_model_dir, attention):
    """transformers 5.x passes a 4-D mask through as it is: a mask that lets every token see only itself gives
    each position the output it has as a sequence of one token; and models with sliding windows or attentions
    that take no mask are told apart."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    assert compat.attention_takes_a_custom_mask(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = torch.cat([model(input_ids=ids[:, i: i + 1]).logits for i in range(4)], dim=1)
    mask = compat.custom_attention_mask(torch.eye(4, dtype=torch.bool)[None], model)
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask, position_ids=torch.zeros_like(ids)).logits
        causal = model(input_ids=ids).logits
    assert torch.allclose(masked, alone, atol=1e-5)
    assert not torch.allclose(causal, alone, atol=1e-3)
    model.config.sliding_window = 4
    assert not compat.attention_takes_a_custom_mask(model)
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    assert not compat.attention_takes_a_custom_mask(model)



def _counting_apply(monkeypatch, tokenizer) -> list:
    calls: list = []
    original = tokenizer.apply_chat_template

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", counted)
    return calls


@pytest.mark.parametrize("name", ["tiny tokenizer's own", *sorted(NAMED_TEMPLATES)])
def test_chat_templates_render_as_apply_chat_template_renders_them(tiny_tokenizer, name, monkeypatch):
    template = tiny_tokenizer.chat_template if name == "tiny tokenizer's own" else NAMED_TEMPLATES[name]
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user", "content": "Hi <s> there"}, {"role": "assistant", "content": " Hello. "},
             {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye.\n"}]
    conversations = [turns[:1], turns[:2], [system, *turns[:3]], [system, *turns], turns]
    expected = {flag: [tiny_tokenizer.apply_chat_template(c, chat_template=template, tokenize=False,
                                                          add_generation_prompt=flag) for c in conversations]
                for flag in (False, True)}
    calls = _counting_apply(monkeypatch, tiny_tokenizer)
    for flag in (False, True):
        assert compat.render_chat_template(tiny_tokenizer, template, conversations, flag) == expected[flag]
    # Rendered by the compiled template: transformers was asked only for the first conversation, as the check.
    assert calls == [conversations[0], conversations[0]]


def test_a_chat_template_that_renders_otherwise_falls_back_to_apply_chat_template(tiny_tokenizer, monkeypatch):
    import transformers.utils.chat_template_utils as chat_template_utils

    compile_template = chat_template_utils._compile_jinja_template
    shouting = compile_template("{% for message in messages %}{{ message['content'] | upper }}{% endfor %}")
    monkeypatch.setattr(chat_template_utils, "_compile_jinja_template", lambda template: shouting)
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]] * 3
    expected = tiny_tokenizer.apply_chat_template(conversations, tokenize=False)
    assert compat.render_chat_template(tiny_tokenizer, tiny_tokenizer.chat_template, conversations, False) == expected
    # Messages that are not plain strings go to apply_chat_template whole.
    calls = _counting_apply(monkeypatch, tiny_tokenizer)
    odd = [[{"role": "user", "content": "hi", "tool_calls": None}, {"role": "assistant", "content": "yo"}]]
    compat.render_chat_template(tiny_tokenizer, tiny_tokenizer.chat_template, odd, False)
    assert calls == [odd]
