"""The adapter alone as a GGUF LoRA file, with the base files it applies to (export/gguf_adapter.py).

What llama.cpp makes of them (loading base + adapter, its KL) is in test_gguf_llamacpp.py; here the files' keys and
tensors, the refusals, and the KL measured without llama.cpp (the files' float16 weights + the adapter, by peft).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import train_tiny_run
from qlora_cli.core.errors import UserError
from qlora_cli.export.gguf_adapter import ADAPTER_FILE, REPORT, export_adapter_gguf, lora_tensors


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("adapter")
    train_tiny_run(folder, tiny_model_dir, chat=True, max_steps=8, learning_rate=5e-3)
    return folder / "run"


@pytest.fixture(scope="module")
def adapter_export(adapter_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter-out") / "export"
    return out, export_adapter_gguf(adapter_run, out=out)


def test_the_lora_file_is_what_llama_cpp_reads_as_an_adapter(adapter_export, adapter_run):
    import gguf
    from safetensors.torch import load_file

    from qlora_cli.export.gguf import _permute

    out, _ = adapter_export
    reader = gguf.GGUFReader(str(out / ADAPTER_FILE))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    # all-linear on 2 layers: 7 weights a layer, an A and a B each.
    assert len(tensors) == 2 * 7 * 2 and all(name.endswith((".lora_a", ".lora_b")) for name in tensors)
    saved = load_file(str(adapter_run / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0."
    a, b = saved[prefix + "self_attn.q_proj.lora_A.weight"], saved[prefix + "self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_a"], a.numpy())  # [r, in]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"], _permute(b.numpy(), 4))  # rows as the base's
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight.lora_b"],
                                  saved[prefix + "mlp.down_proj.lora_B.weight"].numpy())


def test_the_base_dequantized_from_nf4_is_the_closer_and_the_modelfile_applies_the_adapter_to_it(adapter_export):
    out, report = adapter_export
    assert json.loads((out / REPORT).read_text())["bases"] == report["bases"]
    dequantized, original = report["bases"]["dequantized"], report["bases"]["original"]
    assert (out / dequantized["file"]).is_file() and (out / original["file"]).is_file()
    # Measured: 8.9e-8 (float16 rounding of the file) against 6.4e-5 for the original base (NF4 rounding).
    assert dequantized["mean_kl_nats_per_token"] < 1e-6 < original["mean_kl_nats_per_token"]
    assert report["closer_base"] == dequantized["file"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{dequantized['file']}\nADAPTER ./{ADAPTER_FILE}\nTEMPLATE")
    assert 'PARAMETER stop "</s>"' in modelfile


def test_a_dora_adapter_is_refused_before_anything_loads(adapter_run, tmp_path, monkeypatch):
    import shutil

    import qlora_cli.export.merge as merge_module

    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    settings_path = run / "adapter" / "adapter_config.json"
    settings_path.write_text(json.dumps({**json.loads(settings_path.read_text()), "use_dora": True}))
    monkeypatch.setattr(merge_module, "trained_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(UserError, match="DoRA's magnitude vectors"):
        export_adapter_gguf(run, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_lora_on_a_tied_head_is_refused(adapter_run, tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from qlora_cli.export.gguf_arch import ARCHITECTURES

    saved = load_file(str(adapter_run / "adapter" / "adapter_model.safetensors"))
    saved["base_model.model.lm_head.lora_A.weight"] = saved["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].clone()
    save_file(saved, str(tmp_path / "adapter_model.safetensors"))
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with pytest.raises(UserError, match="ties to the embeddings"):
        lora_tensors(tmp_path, config, ARCHITECTURES["llama"])


def test_rank_stabilised_alpha_is_written_as_the_scale_llama_cpp_computes():
    from qlora_cli.export.gguf_adapter import gguf_alpha

    # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r).
    assert gguf_alpha({"lora_alpha": 16, "r": 8}) == 16.0
    assert gguf_alpha({"lora_alpha": 16, "r": 16, "use_rslora": True}) / 16 == pytest.approx(16 / 4)


def test_the_command_refuses_an_unknown_type_before_anything_loads(tmp_path, capsys):
    from qlora_cli.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["gguf-adapter", str(tmp_path), "--type", "q4_0"])
    assert exited.value.code == 2 and "'q4_0' is not one of f16, q8_0" in capsys.readouterr().err


def test_the_command_writes_the_files_and_says_the_kl(adapter_run, tmp_path, capsys):
    from qlora_cli.cli import main

    main(["gguf-adapter", str(adapter_run), "--out", str(tmp_path / "out"), "--type", "q8_0"])
    printed = capsys.readouterr().out
    assert "base dequantized" in printed and "mean KL" in printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Modelfile", ADAPTER_FILE, REPORT, "base-dequantized-q8_0.gguf", "base-original-q8_0.gguf"]
