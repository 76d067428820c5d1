"""Shared fixtures: a tiny Llama and a tokenizer built here, so no test downloads anything."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models gain nothing from a second thread, and on a busy machine the threads of an OpenMP pool spin
# waiting for each other: 9 steps of the tiny Llama took 35 s with two threads and 1.5 s with one (2-core CPU,
# loaded). Set before torch is imported, so subprocesses inherit it; runs of the real model undo it.
ONE_THREAD = "OMP_NUM_THREADS" not in os.environ
os.environ.setdefault("OMP_NUM_THREADS", "1")


def real_model_env() -> dict[str, str]:
    """The environment for a subprocess that trains the bundled model: every core, as a user's run has."""
    return {key: value for key, value in os.environ.items() if not (ONE_THREAD and key == "OMP_NUM_THREADS")}


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where torch sees a GPU, and are reported as skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# A Zephyr-style template that ends every turn with the EOS token, as many chat models do.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Arr! The capital o' Japan be Tokyo, matey. Yo ho ho!",
    "Add two and three. Two plus three makes five.",
    "Write a haiku about the sea. Waves fold into foam, the gull cries over the grey, salt wind on my face.",
    "You are a helpful assistant. Answer briefly and politely.",
    "system user assistant instruction input output question answer",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>|/-_\n",
]


def build_tokenizer(directory: Path):
    """A byte-level BPE tokenizer that adds BOS like Llama's, with a chat template and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


# The RoPE scalings a GGUF export writes for llama.cpp (Llama 3's, linear, YaRN), on a tiny context.
ROPE_SCALINGS = [
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
]


def build_tiny_llama(directory: Path, vocab_size: int, **overrides) -> None:
    """A 2-layer Llama with random weights, saved as safetensors (`overrides`: other config values)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).save_pretrained(directory)


# SmolLM2-Instruct's template: ChatML, with a default system prompt when the conversation has none.
CHATML_DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_chatml_tokenizer(directory: Path, pre_tokenizer=None):
    """A byte-level BPE tokenizer shaped like SmolLM2-Instruct's: ChatML special tokens, no BOS added,
    EOS `<|im_end|>`, the ChatML template with a default system prompt (`pre_tokenizer`: another one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_DEFAULT_SYSTEM_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(directory)
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>"]) == [1, 2]
    build_tiny_llama(directory, len(tokenizer))
    return directory


@pytest.fixture(scope="session")
def chatml_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a ChatML tokenizer (end-of-turn token, no BOS), for exports that read its template."""
    directory = tmp_path_factory.mktemp("chatml")
    tokenizer = build_chatml_tokenizer(directory)
    build_tiny_llama(directory, len(tokenizer), bos_token_id=1, eos_token_id=2)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Add two and three.", "input": "", "output": "Two plus three makes five."},
    {"instruction": "Answer the question.", "input": "What is the capital of Japan?", "output": "Arr! Tokyo, matey."},
    {"instruction": "Write a haiku about the sea.", "input": "", "output": "Waves fold into foam, the gull cries over the grey, salt wind on my face."},
]

CHAT_ROWS = [
    {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan?"},
        {"role": "assistant", "content": "Tokyo, matey."},
    ]},
    {"conversations": [
        {"from": "human", "value": "Add two and three."},
        {"from": "gpt", "value": "Five."},
    ]},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path



@pytest.fixture(scope="session")
def tokenized_rows(tiny_tokenizer, tmp_path_factory):
    """ALPACA_ROWS and CHAT_ROWS tokenized for training with the tiny tokenizer's chat template."""
    from qlora_cli.data.sources import load_datasets
    from qlora_cli.data.tokenize import TokenizeOptions, tokenize_examples
    from qlora_cli.core.recipe import DataSection

    folder = tmp_path_factory.mktemp("rows")
    write_jsonl(folder / "a.jsonl", ALPACA_ROWS)
    write_jsonl(folder / "c.jsonl", CHAT_ROWS)
    data = DataSection(train=[{"path": folder / "a.jsonl"}, {"path": folder / "c.jsonl"}])
    examples = load_datasets(data, seed=0).train
    tokenized, _ = tokenize_examples(tiny_tokenizer, tiny_tokenizer.chat_template, examples, TokenizeOptions(max_seq_len=512))
    return tokenized

def tiny_recipe_text(model_dir: Path, data_files: list[str], **training) -> str:
    """A recipe for the tiny model, with the quickstart's shape and a few steps."""
    options = {"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 4, "logging_steps": 1,
               "learning_rate": 1e-3, "gradient_checkpointing": True, **training}
    lines = [
        "model:",
        f"  base: {model_dir}",
        "lora:",
        "  r: 8",
        "  alpha: 16",
        "  dropout: 0.0",
        # `auto` picks bfloat16 on CPUs with native bfloat16: pinned so that stored figures hold on every CPU.
        "quantization:",
        "  compute_dtype: float32",
        "data:",
        "  train:",
        *[f"    - path: {name}" for name in data_files],
        "  max_seq_len: 128",
        "training:",
        *[f"  {key}: {json.dumps(value)}" for key, value in options.items()],
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir) -> Path:
    """A recipe file with alpaca and chat data beside it; the run goes to tmp_path/run."""
    write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        tiny_recipe_text(tiny_model_dir, ["alpaca.jsonl", "chat.jsonl"]) + "output:\n  dir: run\n",
        encoding="utf-8",
    )
    return recipe


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Converted models and tokenized data go to a folder of the test session, not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_CACHE", str(tmp_path_factory.mktemp("qlora-cache")))
        yield


def trained_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of trained label ids (what the loss is taken on), for decoding."""
    from qlora_cli.data.tokenize import IGNORE_INDEX

    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans


def train_tiny_run(folder: Path, model_dir: Path, chat: bool = False, **training):
    """Train the tiny model on the alpaca rows (and the chat rows) into folder/run; returns the TrainingRun."""
    import io

    from rich.console import Console

    from qlora_cli.core.recipe import load_recipe
    from qlora_cli.train.run import run_training

    write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    files = ["alpaca.jsonl"]
    if chat:
        write_jsonl(folder / "chat.jsonl", CHAT_ROWS)
        files.append("chat.jsonl")
    path = folder / "tiny.yaml"
    path.write_text(tiny_recipe_text(model_dir, files, **training) + "output:\n  dir: run\n")
    return run_training(load_recipe(path), console=Console(file=io.StringIO(), width=120))


def interrupt_at_checkpoint(command: list[str], run_dir: Path, step: int) -> str:
    """Start `command` (a `qlora train` process), send it SIGINT once its checkpoint `step` exists, and return its
    stderr; it must have exited with 130, as an interrupted run does."""
    import signal
    import subprocess

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run_dir / "checkpoints" / f"step-{step}").is_dir():
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate()
    assert process.returncode == 130, err[-3000:]
    return err


@contextlib.contextmanager
def serving(app):
    """An ASGI `app` (`qlora serve`'s) on 127.0.0.1 on a free port, in a thread; yields the /v1 base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join()


# Tiny random models of each architecture the GGUF export writes, with each one's particulars switched on where a
# tiny model can have them (biases, q/k norms, soft-capping, sliding windows that matter within 100 tokens, Phi-3's
# fused projections, Gemma's tied head); hidden 64, 2 layers, head_dim 16.
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
                                "tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
                                         "layer_types": ["sliding_attention", "full_attention"],
                                         "final_logit_softcapping": 30.0, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"pad_token_id": None}),
}


def build_tiny_model(directory: Path, model_type: str, vocab_size: int, **overrides) -> None:
    """A 2-layer model of `model_type` (a key of TINY_ARCHITECTURES) with random weights, saved as safetensors.
    Norm weights are random too (transformers initialises them to 1, or to 0 for Gemma), so that an export that
    dropped or mis-shifted one would show."""
    import torch
    import transformers

    class_name, particulars = TINY_ARCHITECTURES[model_type]
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False)
    config = getattr(transformers, class_name)(**{**settings, **particulars, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                parameter.copy_(torch.randn_like(parameter) * 0.1 + (0.0 if model_type.startswith("gemma") else 1.0)
                                * (not name.endswith(".bias")))
    model.save_pretrained(directory)
