"""GGUF export metadata and the Ollama Modelfile, on tiny models built here (no llama.cpp needed).

What llama.cpp itself makes of the files is tested in test_gguf_llamacpp.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import (
    CHATML_DEFAULT_SYSTEM_TEMPLATE, ROPE_SCALINGS, build_chatml_tokenizer, build_tiny_llama,
)
from qlora_cli.core.errors import UserError
from qlora_cli.export.gguf import export_gguf, llama3_rope_factors, pre_tokenizer_name, tokenizer_spec
from qlora_cli.export.modelfile import (
    LATER_SYSTEM_CONVERSATION,
    OPEN_REPLY_CONVERSATION,
    VERIFY_CONVERSATIONS,
    TemplateShapeError,
    derive_turn_format,
    go_template,
    modelfile_for,
    render_like_ollama,
    verify_turn_format,
)

# Llama 3's template shape: BOS written by the template, a header per message, trimmed content.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# A template that rewrites an earlier turn once a later one exists: no prefix/suffix description holds.
REWRITING_TEMPLATE = (
    "{% for message in messages %}{% if loop.last %}LAST {% endif %}{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {name: field.contents() for name, field in reader.fields.items()}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("gguf") / "model-f16.gguf"
    export_gguf(tiny_model_dir, path, "f16")
    return read_gguf(path)


def test_tiny_export_has_the_tokenizer_as_it_behaves(tiny_export, tiny_tokenizer, tiny_model_dir):
    import gguf

    reader, fields = tiny_export
    # Not a known hash, but GPT-2's exact normalizer and pre-tokenizer: llama.cpp's "gpt-2" regex.
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"] is True  # its post-processor puts <s> first
    assert fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id == 1
    assert fields["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id == 2
    # The template closes each turn with the EOS token, so that is the end-of-turn token.
    assert fields["tokenizer.ggml.eot_token_id"] == 2
    assert fields["tokenizer.chat_template"] == tiny_tokenizer.chat_template
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(tiny_tokenizer)
    # Special tokens are control tokens (llama.cpp matches them whole in text), the rest normal.
    control = {i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL}
    assert control == set(tiny_tokenizer.all_special_ids) and len(control) == 6
    assert all(kind in (gguf.TokenType.CONTROL, gguf.TokenType.NORMAL) for kind in types)
    assert tokens[tiny_tokenizer.convert_tokens_to_ids("<|user|>")] == "<|user|>"
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    assert len(fields["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


def test_chatml_export_takes_the_end_of_turn_token_and_no_bos(tmp_path, chatml_model_dir):
    export_gguf(chatml_model_dir, tmp_path / "m.gguf", "q8_0")
    _, fields = read_gguf(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.add_bos_token"] is False  # like SmolLM2: BOS defined, never added
    assert fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>, not <|endoftext|> (id 0)
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.chat_template"] == CHATML_DEFAULT_SYSTEM_TEMPLATE


def test_unknown_pre_tokenizer_is_refused_with_its_hash(tmp_path):
    from tokenizers import pre_tokenizers

    # SmolLM's own pre-tokenizer shape (digits split first) with a vocabulary llama.cpp has never seen.
    split_digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer = build_chatml_tokenizer(tmp_path, pre_tokenizer=split_digits)
    build_tiny_llama(tmp_path, len(tokenizer))
    with pytest.raises(UserError, match=r"does not recognise this tokenizer's pre-tokenizer \(hash [0-9a-f]{64}") as error:
        export_gguf(tmp_path, tmp_path / "m.gguf", "f16")
    assert "convert_hf_to_gguf.py" in str(error.value) and "Digits" in str(error.value)
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_is_recognised_by_llama_cpp_hash_first(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from hashlib import sha256

    from qlora_cli.export import gguf as gguf_export

    spec = tokenizer_spec(tiny_tokenizer)
    digest = sha256(str(tiny_tokenizer.encode(gguf_export.PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    monkeypatch.setitem(gguf_export.KNOWN_PRE_TOKENIZERS, digest, "smollm")
    assert pre_tokenizer_name(tiny_tokenizer, spec) == "smollm"


def test_sentencepiece_style_tokenizer_is_refused(tmp_path, tiny_model_dir):
    for name in ["config.json", "model.safetensors", "tokenizer_config.json"]:
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="not a byte-level BPE tokenizer"):
        export_gguf(tmp_path, tmp_path / "m.gguf", "f16")


def test_llama3_rope_factors_are_what_transformers_scales_by():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    factors = llama3_rope_factors(params, 128)
    np.testing.assert_allclose(factors, plain / scaled.numpy(), rtol=1e-4)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the smooth ramp are reached


@pytest.mark.parametrize("rope", ROPE_SCALINGS, ids=lambda rope: rope["rope_type"])
def test_rope_scaling_is_written(tmp_path, tiny_tokenizer, rope):
    tiny_tokenizer.save_pretrained(tmp_path)
    build_tiny_llama(tmp_path, len(tiny_tokenizer), rope_parameters=rope)
    export_gguf(tmp_path, tmp_path / "m.gguf", "f16")
    reader, fields = read_gguf(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    if rope["rope_type"] == "llama3":
        np.testing.assert_allclose(np.asarray(tensors["rope_freqs.weight"].data), llama3_rope_factors(rope, 16))
        assert "llama.rope.scaling.type" not in fields  # llama.cpp reads the tensor, as its converter writes it
    else:
        assert "rope_freqs.weight" not in tensors
        assert fields["llama.rope.scaling.type"] == rope["rope_type"]
        assert fields["llama.rope.scaling.factor"] == rope["factor"]
    if rope["rope_type"] == "yarn":
        assert fields["llama.rope.scaling.original_context_length"] == 128


def test_rope_scaling_in_the_legacy_keys_is_written(tmp_path, tiny_tokenizer):
    # Llama 3.1's config.json as published: `rope_scaling` and a top-level `rope_theta`, which transformers
    # reads into `rope_parameters`.
    rope = ROPE_SCALINGS[0]
    tiny_tokenizer.save_pretrained(tmp_path)
    build_tiny_llama(tmp_path, len(tiny_tokenizer), rope_parameters=rope)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    config["rope_theta"] = 500000.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    export_gguf(tmp_path, tmp_path / "m.gguf", "f16")
    reader, fields = read_gguf(tmp_path / "m.gguf")
    assert fields["llama.rope.freq_base"] == 500000.0
    factors = np.asarray({t.name: t for t in reader.tensors}["rope_freqs.weight"].data)
    np.testing.assert_allclose(factors, llama3_rope_factors({**rope, "rope_theta": 500000.0}, 16))


def test_unsupported_rope_scaling_is_refused(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    build_tiny_llama(tmp_path, len(tiny_tokenizer), rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UserError, match="RoPE scaling 'dynamic' is not supported"):
        export_gguf(tmp_path, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def jinja_render(tokenizer, template):
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    return render


def template_of(modelfile: str) -> str | None:
    match = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    return match.group(1) if match else None


def test_modelfile_of_a_chatml_model_writes_the_default_system_prompt(chatml_model_dir):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(chatml_model_dir)
    text, reason = modelfile_for(tokenizer, GenerationConfig.from_pretrained(chatml_model_dir), "model-f16.gguf")
    assert reason is None
    assert text.startswith("FROM ./model-f16.gguf\nTEMPLATE \"\"\"")
    assert text.endswith('PARAMETER stop "<|im_end|>"\n')
    turns = derive_turn_format(jinja_render(tokenizer, CHATML_DEFAULT_SYSTEM_TEMPLATE))
    assert turns.head == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert (turns.first_system_prefix, turns.system_suffix) == ("<|im_start|>system\n", "<|im_end|>\n")
    assert (turns.user_prefix, turns.user_suffix) == ("<|im_start|>user\n", "<|im_end|>\n")
    assert turns.generation_prompt == "<|im_start|>assistant\n"
    assert template_of(text) == go_template(turns)


def test_bos_is_left_to_llama_cpp_when_it_adds_one(tiny_tokenizer):
    # The tiny tokenizer adds <s>; a Llama 3-style template also writes it: Ollama must not get it twice.
    render = jinja_render(tiny_tokenizer, LLAMA3_STYLE_TEMPLATE)
    turns = derive_turn_format(render, bos_text="<s>")
    assert turns.head == "" and turns.first_system_prefix == "<|start_header_id|>system<|end_header_id|>\n\n"
    verify_turn_format(turns, render, bos_text="<s>")
    assert render([{"role": "user", "content": "Hi"}], True).startswith("<s>")
    assert not render_like_ollama(turns, [{"role": "user", "content": "Hi"}]).startswith("<s>")


@pytest.mark.parametrize("name", ["alpaca", "guanaco", "chatml", "llama3", "zephyr", "phi3"])
def test_named_templates_get_an_ollama_template_that_renders_the_same(tiny_tokenizer, name):
    from qlora_cli.data.named_templates import NAMED_TEMPLATES

    render = jinja_render(tiny_tokenizer, NAMED_TEMPLATES[name])
    turns = derive_turn_format(render)
    verify_turn_format(turns, render)
    for conversation in VERIFY_CONVERSATIONS:
        assert render_like_ollama(turns, conversation) == render(conversation, True)


@pytest.mark.parametrize("name", ["llama2", "mistral", "gemma"])
def test_templates_that_fold_the_system_prompt_into_the_first_turn_are_refused(tiny_tokenizer, name):
    from qlora_cli.data.named_templates import NAMED_TEMPLATES

    # They write the system prompt inside the first user message, which prefix + content + suffix
    # per message cannot describe: the Modelfile then has no TEMPLATE rather than a wrong one.
    with pytest.raises(TemplateShapeError, match="after a system message"):
        derive_turn_format(jinja_render(tiny_tokenizer, NAMED_TEMPLATES[name]))


def test_a_template_that_rewrites_turns_gets_no_template(tiny_tokenizer, tiny_model_dir):
    from transformers import GenerationConfig

    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = REWRITING_TEMPLATE
    text, reason = modelfile_for(tokenizer, GenerationConfig.from_pretrained(tiny_model_dir), "m.gguf")
    assert template_of(text) is None and "TEMPLATE" not in text
    assert "rewrites earlier turns" in reason
    assert text == 'FROM ./m.gguf\nPARAMETER stop "</s>"\n'


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    """A binary that renders Go text/templates over Ollama's `.Messages`, as Ollama executes TEMPLATE."""
    if shutil.which("go") is None:
        pytest.skip("needs the Go toolchain (apt-get install golang-go) to execute Go templates")
    folder = tmp_path_factory.mktemp("gorender")
    (folder / "main.go").write_text(GO_RENDERER)
    subprocess.run(["go", "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True,
                   capture_output=True, env={**os.environ, "GO111MODULE": "off"})
    return folder / "render"


GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct{ Messages []Message }

func main() {
	var in struct {
		Template      string      `json:"template"`
		Conversations [][]Message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(in.Template))
	var out []string
	for _, messages := range in.Conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, Values{Messages: messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.parametrize("template_name", ["tiny", "chatml-default-system", "llama3-style"])
def test_go_executes_the_template_as_the_jinja_one_renders(go_renderer, tiny_tokenizer, template_name):
    template, bos = {"tiny": (tiny_tokenizer.chat_template, None),
                     "chatml-default-system": (CHATML_DEFAULT_SYSTEM_TEMPLATE, None),
                     "llama3-style": (LLAMA3_STYLE_TEMPLATE, "<s>")}[template_name]
    render = jinja_render(tiny_tokenizer, template)
    turns = derive_turn_format(render, bos_text=bos)
    conversations = VERIFY_CONVERSATIONS + [LATER_SYSTEM_CONVERSATION, OPEN_REPLY_CONVERSATION]
    request = json.dumps({"template": go_template(turns), "conversations": conversations})
    rendered = json.loads(subprocess.run([str(go_renderer)], input=request, capture_output=True, text=True, check=True).stdout)
    for conversation, got in zip(conversations, rendered):
        assert got == render_like_ollama(turns, conversation)
        if conversation is OPEN_REPLY_CONVERSATION:
            continue
        if conversation is LATER_SYSTEM_CONVERSATION and turns.later_system_prefix is None:
            continue
        assert got == render(conversation, True).removeprefix(bos or "")


def test_merge_summary_line_of_an_export():
    from qlora_cli.export.gguf import gguf_summary

    entry = {"file": "model-f16.gguf", "bytes": 270885664, "max_abs_logit_diff": 5.5e-05, "mean_kl_nats_per_token": 3.9e-08,
             "llama_cpp": {"checked": True, "identical": 374, "lines": 374, "mismatches": []},
             "modelfile": {"file": "model-f16.Modelfile", "template": True}}
    assert gguf_summary(entry) == ("model-f16.gguf, 271 MB; max |Δlogit| 5.5e-05, KL 3.9e-08; "
                                   "llama.cpp tokenizes 374/374 check lines alike; model-f16.Modelfile")
    entry["llama_cpp"] = {"checked": False, "reason": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    entry["modelfile"]["template"] = False
    assert gguf_summary(entry).endswith("check skipped: llama-cpp-python is not installed (pip install llama-cpp-python); "
                                        "model-f16.Modelfile (no TEMPLATE)")


def test_the_modelfile_stops_at_every_end_token_generation_stops_at(tmp_path, tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    from qlora_cli.inference.generate import stop_token_ids
    from qlora_cli.core.models import LoadedModel
    from qlora_cli.export.modelfile import write_modelfile

    # As Llama 3.1's generation_config.json lists <|eot_id|> and <|eom_id|> beside the EOS token.
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, tmp_path / name)
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 3]).save_pretrained(tmp_path)
    tokenizer, generation_config = AutoTokenizer.from_pretrained(tmp_path), GenerationConfig.from_pretrained(tmp_path)
    written = write_modelfile(tmp_path / "m.gguf", tokenizer, generation_config, say=lambda *_: None)
    assert written["stop"] == ["</s>", "<|user|>"]
    assert 'PARAMETER stop "</s>"\nPARAMETER stop "<|user|>"\n' in (tmp_path / "m.Modelfile").read_text()
    # What `qlora generate` stops at, as text.
    model = SimpleNamespace(generation_config=generation_config)
    assert written["stop"] == [tokenizer.decode([i]) for i in stop_token_ids(LoadedModel(model, tokenizer, "m"))]


def test_an_unknown_gguf_type_is_refused_before_anything_loads(tmp_path, capsys):
    from qlora_cli.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["merge", str(tmp_path), "--gguf", "f16", "--gguf", "q4_0"])
    assert exited.value.code == 2 and "--gguf: 'q4_0' is not one of f16, q8_0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Every architecture: gguf-py's names and keys, each one's particulars as llama.cpp's converter writes them

TINY_VOCAB = 448  # more rows than the tokenizer's 400 tokens (and Qwen2's tokenizer class adds one): padded rows too


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def arch_export(request, tmp_path_factory):
    """(model_type, the model in float32, the f16 file's reader, its fields) of a tiny model of each architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model, build_tokenizer

    folder = tmp_path_factory.mktemp(request.param)
    build_tokenizer(folder)
    build_tiny_model(folder, request.param, TINY_VOCAB)
    export_gguf(folder, folder / "m.gguf", "f16", name="tiny")  # not the folder's: see check_name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return (request.param, model, *read_gguf(folder / "m.gguf"))


# What llama.cpp's graph of each architecture reads (src/models/*.cpp) beyond the Llama-shaped tensors.
EXPECTED_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                 "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
PARTICULAR_TENSORS = {
    "llama": {"output.weight"},
    "mistral": {"output.weight"},
    "qwen2": {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"},
    "qwen3": {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "output.weight"},
    "gemma": set(),
    "gemma2": {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"},
    "gemma3_text": {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.attn_q_norm.weight",
                    "blk.0.attn_k_norm.weight"},
    "phi3": {"blk.0.attn_qkv.weight", "output.weight"},
}
LLAMA_SHAPED = {"token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight",
                "blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}


def test_each_architecture_has_the_tensors_llama_cpp_reads(arch_export):
    kind, model, reader, fields = arch_export
    assert fields["general.architecture"] == EXPECTED_ARCH[kind]
    names = {tensor.name for tensor in reader.tensors}
    layer0 = {name for name in names if not name.startswith("blk.") or name.startswith("blk.0.")}
    separate_qkv = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_gate.weight"}
    expected = LLAMA_SHAPED | PARTICULAR_TENSORS[kind] | (set() if kind == "phi3" else separate_qkv)
    assert layer0 == expected
    assert len(names) == len(layer0) + (len(layer0) - sum(not n.startswith("blk.") for n in layer0))  # both layers


def test_each_architecture_has_its_hyperparameters(arch_export):
    kind, model, reader, fields = arch_export
    arch = EXPECTED_ARCH[kind]
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == 64
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == 16
    assert fields[f"{arch}.context_length"] == 512 and fields[f"{arch}.feed_forward_length"] == 128
    assert fields[f"{arch}.rope.dimension_count"] == 16
    assert len(fields["tokenizer.ggml.tokens"]) == TINY_VOCAB
    # transformers loads a Qwen2 model's tokenizer with Qwen2's pre-tokenizer whatever tokenizer.json says: the file
    # says what splits text once loaded (Qwen3's keeps the file's).
    assert fields["tokenizer.ggml.pre"] == ("qwen2" if kind == "qwen2" else "gpt-2")
    if kind == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    if kind in ("gemma2", "gemma3_text"):
        assert fields[f"{arch}.attention.sliding_window"] == 24
        assert list(fields[f"{arch}.attention.sliding_window_pattern"]) == [True, False]  # layer 0 slides
    else:
        assert f"{arch}.attention.sliding_window_pattern" not in fields
    if kind == "gemma3_text":
        assert fields["gemma3.rope.freq_base"] == 1_000_000.0 and fields["gemma3.rope.freq_base_swa"] == 10_000.0
        assert fields["gemma3.final_logit_softcapping"] == 30.0
    if kind == "phi3":
        assert fields["phi3.rope.scaling.original_context_length"] == 4096


def tensor_data(reader, name):
    return np.asarray({t.name: t for t in reader.tensors}[name].data)


def test_gemma_norms_are_written_plus_one_and_others_as_they_are(arch_export):
    kind, model, reader, _ = arch_export
    state = model.state_dict()
    offset = 1.0 if kind.startswith("gemma") else 0.0
    np.testing.assert_allclose(tensor_data(reader, "blk.1.attn_norm.weight"),
                               state["model.layers.1.input_layernorm.weight"].numpy() + offset, rtol=1e-6)
    np.testing.assert_allclose(tensor_data(reader, "output_norm.weight"), state["model.norm.weight"].numpy() + offset,
                               rtol=1e-6)
    if kind in ("qwen3", "gemma3_text"):  # the per-head q/k norms too (Gemma 3's scale by 1 + w as well)
        np.testing.assert_allclose(tensor_data(reader, "blk.0.attn_q_norm.weight"),
                                   state["model.layers.0.self_attn.q_norm.weight"].numpy() + offset, rtol=1e-6)


def test_query_rows_are_permuted_for_llama_cpp_llama_graph_only(arch_export):
    from qlora_cli.export.gguf import _permute

    kind, model, reader, _ = arch_export
    if kind == "phi3":
        # The fused projections as they are: llama.cpp splits attn_qkv into q, k, v and ffn_up into gate, up.
        state = model.state_dict()
        np.testing.assert_allclose(tensor_data(reader, "blk.0.attn_qkv.weight"),
                                   state["model.layers.0.self_attn.qkv_proj.weight"].numpy().astype(np.float16))
        assert tensor_data(reader, "blk.0.ffn_up.weight").shape == (256, 64)  # gate and up, stacked
        return
    weight = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    expected = _permute(weight, 4) if kind in ("llama", "mistral") else weight
    np.testing.assert_allclose(tensor_data(reader, "blk.0.attn_q.weight"), expected.astype(np.float16))


def test_a_tied_head_is_left_to_the_embeddings(arch_export):
    kind, model, reader, _ = arch_export
    names = {tensor.name for tensor in reader.tensors}
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)


def _config(class_name: str, **values):
    import transformers

    settings = dict(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)
    return getattr(transformers, class_name)(**{**settings, **values})


REFUSALS = [
    ("Phi3Config", {"pad_token_id": None, "max_position_embeddings": 8192, "original_max_position_embeddings": 4096,
                    "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8,
                                        "short_factor": [1.0] * 8}},
     "RoPE scaling 'longrope' .*by the context size it is started with"),
    ("Qwen2Config", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     "RoPE scaling 'dynamic' .*no dynamic NTK"),
    ("Qwen2Config", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}},
     "RoPE scaling 'llama3' is not supported in the GGUF export of qwen2"),
    ("GemmaConfig", {"head_dim": 16, "tie_word_embeddings": False}, "output head of its own .* ignores"),
    ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 32, "tie_word_embeddings": True},
     r"query_pre_attn_scalar 32: llama.cpp scales the queries of a 2-layer gemma2 by 1/sqrt\(16\)"),
    ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": None},
     "without attn_logit_softcapping: llama.cpp's gemma2 always soft-caps"),
    ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0},
     "does not cap attention logits"),
    ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "use_bidirectional_attention": True},
     "bidirectional attention"),
    ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}},
     "of the sliding-window layers is not supported"),
    ("LlamaConfig", {"hidden_act": "gelu"}, "llama with the 'gelu' activation: llama.cpp computes 'silu'"),
    ("Gemma3Config", None, "vision tower"),  # None: the class's defaults
    ("MixtralConfig", None, "mixture of experts"),
    ("FalconConfig", None, "writes llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3 models"),
]


@pytest.mark.parametrize("class_name, values, message", REFUSALS,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(REFUSALS)])
def test_what_llama_cpp_would_compute_differently_is_refused_from_the_config(class_name, values, message):
    from qlora_cli.export.gguf_arch import check_architecture

    import transformers

    config = getattr(transformers, class_name)() if values is None else _config(class_name, **values)
    with pytest.raises(UserError, match=message):
        check_architecture(config)


@pytest.mark.parametrize("class_name, values", [
    ("MistralConfig", {"sliding_window": 32}),
    ("Phi3Config", {"pad_token_id": None, "sliding_window": 32}),
    ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1}),
])
def test_a_window_llama_cpp_does_not_apply_shortens_the_declared_context(class_name, values):
    from qlora_cli.export.gguf_arch import architecture_of, check_architecture, context_length

    config = _config(class_name, **values)
    notes = check_architecture(config)
    assert context_length(config, architecture_of(config)) == (32, notes[0])
    assert "declares a context of 32 tokens (not 512)" in notes[0]
    # A window as long as the context changes nothing (Mistral's default 4096 here).
    config = _config(class_name, **{**values, "sliding_window": 512})
    assert check_architecture(config) == [] and context_length(config, architecture_of(config))[0] == 512


def test_the_shortened_context_is_what_the_file_declares(tmp_path):
    from conftest import build_tiny_model, build_tokenizer

    build_tokenizer(tmp_path)
    build_tiny_model(tmp_path, "mistral", TINY_VOCAB, sliding_window=32)
    export_gguf(tmp_path, tmp_path / "m.gguf", "f16")
    _, fields = read_gguf(tmp_path / "m.gguf")
    assert fields["llama.context_length"] == 32


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_the_merge_counts_the_parameters_and_gguf_bytes_of_every_architecture(arch_export, out_type, tmp_path):
    from qlora_cli.export.merge_plan import MergeSettings, merge_needs

    kind, model, _, _ = arch_export
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    export_gguf_from = folder.parent / "file.gguf"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model.name_or_path).save_pretrained(folder)
    export_gguf(folder, export_gguf_from, out_type)
    config = json.loads((folder / "config.json").read_text())
    settings = MergeSettings(bits=4, double_quant=True, lora_r=8, target_modules="all-linear", compute_bytes=4,
                             out_bytes=4, max_shard_bytes=2**30, prompt_tokens=100, on_gpu=False,
                             gguf_types=(out_type,))
    needs = merge_needs(config, settings)
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied head once
    assert needs.parameters == sum(unique.values())
    reader, _ = read_gguf(export_gguf_from)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    merged_bytes = 4 * needs.parameters
    # The disk figure: the merged float32 checkpoint and the GGUF tensors (norms and biases are float32 in GGUF,
    # counted at the file type's bytes: a few KB here).
    assert abs(needs.disk_bytes - merged_bytes - tensor_bytes) < 0.03 * tensor_bytes


def test_a_name_llama_cpp_takes_for_phi3_is_refused_unless_the_tokenizer_is_phi3_like(tiny_tokenizer):
    from qlora_cli.export.gguf import check_name

    check_name("pirate", tiny_tokenizer)
    # llama.cpp then strips the whitespace after special tokens and needs <|endoftext|>: the tiny tokenizer has neither.
    with pytest.raises(UserError, match=r"model named 'my-Phi-3-pirate' .*it lacks <\|endoftext\|>\); choose an output"):
        check_name("my-Phi-3-pirate", tiny_tokenizer)


def test_gemma2_without_sliding_layers_says_so_layer_by_layer(tmp_path):
    from conftest import build_tiny_model, build_tokenizer

    # Without the flags llama.cpp would slide every other layer over 4096 tokens, its Gemma 2 default.
    build_tokenizer(tmp_path)
    build_tiny_model(tmp_path, "gemma2", TINY_VOCAB, layer_types=["full_attention", "full_attention"])
    export_gguf(tmp_path, tmp_path / "m.gguf", "f16")
    _, fields = read_gguf(tmp_path / "m.gguf")
    assert list(fields["gemma2.attention.sliding_window_pattern"]) == [False, False]
