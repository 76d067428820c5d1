"""GGUF export of a merged checkpoint, for llama.cpp and Ollama (f16 or q8_0): Llama, Mistral, Qwen2/2.5, Qwen3,
Gemma 1/2/3 (text) and Phi-3, each as llama.cpp's own converter (convert_hf_to_gguf.py) writes it (the
architectures' particulars are one table, gguf_arch.py), with a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM,
Mistral Nemo's Tekken), so that llama.cpp tokenizes text exactly as the model was trained:

- tensors renamed with gguf-py's name map of the architecture; for llama.cpp's LLAMA graph the query and key
  projections permuted into its rotary layout; Gemma's norm weights + 1;
- `tokenizer.ggml.pre`, the pre-tokenizer llama.cpp splits text with, recognised as the converter
  does: by hashing the tokenization of a fixed text. A tokenizer it does not know is refused, never
  written as "default" (llama.cpp would then split `it's` and whitespace runs differently);
- the token list and types from the tokenizer itself (special added tokens are control tokens that
  llama.cpp matches in text), merges, special token ids and the chat template through
  `gguf.SpecialVocab`, with `add_bos_token`/`add_eos_token` set to what the tokenizer really does
  and the end-of-turn token of the chat template written as EOT;
- RoPE scaling: Llama 3.x `llama3` frequencies as the `rope_freqs` tensor, linear and YaRN as keys;
  any other kind is refused (gguf_arch.check_architecture).

Each file is checked by loading it back with transformers' GGUF loader (logits against the merged
model, for the architectures that loader reads) and, where llama-cpp-python is installed, by llama.cpp's own
tokenizer (see gguf_check.py). An Ollama Modelfile is written beside each file (see modelfile.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data.templates import end_of_turn_token
from ..data.tokenize import tokenizer_adds_bos
from ..core.errors import UserError
from .gguf_arch import Architecture, architecture_of, check_architecture, context_length, head_dim, rope_dimensions, rope_parameters
from .gguf_check import INSTALL_HINT, llama_cpp_available, llama_cpp_logits, llama_cpp_tokenization_check
from .gguf_types import check_gguf_types
from .modelfile import write_modelfile
from .parity import compare_logits, model_logits


# The text llama.cpp's converter tokenizes to recognise a pre-tokenizer (convert_hf_to_gguf.py,
# get_vocab_base_pre); the sha256 of str(tokenizer.encode(text)) names it.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# The hashes llama.cpp's converter maps to a pre-tokenizer name, for the byte-level BPE tokenizers of the
# architectures exported here. Copied from its get_vocab_base_pre (conversion/base.py).
KNOWN_PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B (Qwen2, 2.5, 3 alike)
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o (Phi-4)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M (and SmolLM2)
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}

# GPT-2's own pre-tokenizer as tokenizers writes it: the regex llama.cpp calls "gpt-2", byte-level.
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k row order -> llama.cpp's (the inverse of transformers' `_reverse_permute_weights`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tokenizer_spec(tokenizer) -> dict:
    """The tokenizer as it tokenizes once loaded, a byte-level BPE tokenizer (see `check_byte_level_bpe`): not
    always its tokenizer.json, since transformers gives some model types their own normalizer and pre-tokenizer
    (a Qwen2 model's tokenizer splits text with Qwen2's regex and NFC-normalizes it, whatever the file says).

    Raises:
        UserError: another kind of tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--gguf: the tokenizer is not a fast (tokenizers) tokenizer; only byte-level BPE "
                        "tokenizers are exported")
    return check_byte_level_bpe(json.loads(backend.to_str()), "the tokenizer")


def check_byte_level_bpe(spec: dict, where: str) -> dict:
    """`spec` (a tokenizer.json), if it is a byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM).

    Raises:
        UserError: another kind of tokenizer (SentencePiece-style BPE with byte fallback, as Llama 2, Mistral 7B,
            Gemma and Phi-3 use, is another kind).
    """
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UserError(
            f"--gguf: {where} is not a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM, Mistral Nemo); only those "
            "are exported (the SentencePiece-style tokenizers of Llama 2, Mistral 7B, Gemma and Phi-3 are not). "
            "Convert the merged folder with llama.cpp's convert_hf_to_gguf.py instead"
        )
    return spec


# Qwen2's pre-tokenizer as tokenizers writes it (Qwen2, 2.5 and 3 alike): llama.cpp's "qwen2" regex, then the
# byte-level mapping without GPT-2's regex. Qwen's NFC normalizer is left out by llama.cpp, as by its converter.
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _is_qwen2_pre_tokenizer(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2 or (spec.get("normalizer") or {}).get("type", "NFC") != "NFC":
        return False
    split, byte_level = steps
    return (split.get("type") == "Split" and split.get("pattern") == {"Regex": QWEN2_SPLIT}
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
            and byte_level.get("add_prefix_space") is False)


def pre_tokenizer_name(tokenizer, spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`).

    Recognised as llama.cpp's converter does, by the hash of the tokenization of a fixed text; a
    tokenizer whose normalizer and pre-tokenizer are exactly GPT-2's (whatever its vocabulary) is
    "gpt-2", the same regex in llama.cpp.

    Raises:
        UserError: neither, naming the hash, so that llama.cpp never falls back to its default split.
    """
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    if spec.get("normalizer") is None and spec.get("pre_tokenizer") == GPT2_PRE_TOKENIZER:
        return "gpt-2"
    if _is_qwen2_pre_tokenizer(spec):
        return "qwen2"
    raise UserError(
        f"--gguf: llama.cpp does not recognise this tokenizer's pre-tokenizer (hash {digest} of the "
        "tokenization of llama.cpp's check text, pre-tokenizer "
        f"{json.dumps(spec.get('pre_tokenizer'))}), so it would split text differently from training. "
        "If a newer llama.cpp knows it, convert the merged folder with its convert_hf_to_gguf.py"
    )


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as control tokens even when not marked special."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def check_vocabulary_fits(tokenizer, vocab_size: int) -> None:
    """Raises UserError when the tokenizer has ids beyond the model's embedding rows."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:
        raise UserError(f"--gguf: the tokenizer has ids up to {largest}, the model only {vocab_size} embedding rows")


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """One token string and llama.cpp token type per embedding row, as llama.cpp's converter writes a
    byte-level BPE vocabulary: special added tokens are CONTROL (matched whole in text), other added
    tokens USER_DEFINED, rows no token uses UNUSED padding. Ids beyond the rows are refused before
    (`check_vocabulary_fits`).
    """
    vocab = tokenizer.get_vocab()
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            # llama.cpp matches added tokens as raw text, so store the text a non-normalized token matches.
            if not decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[index].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def tokenizer_adds_eos(tokenizer) -> bool:
    """Whether the tokenizer puts its EOS token last when encoding a text by default."""
    if tokenizer.eos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def special_vocab(model_dir: Path, tokenizer, vocab_size: int):
    """gguf's SpecialVocab of the folder (merges, special ids, chat template), corrected to what the
    tokenizer does: its own special ids, whether it adds BOS/EOS, and the chat template's end-of-turn
    token as EOT (llama.cpp otherwise guesses EOT from token texts and can pick `<|endoftext|>`)."""
    # Its guesses from the post-processor (logged as warnings) are replaced below by measured behaviour.
    vocab_logger = logging.getLogger("gguf.vocab")
    level = vocab_logger.level
    vocab_logger.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    finally:
        vocab_logger.setLevel(level)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            special.special_token_ids[kind] = token_id
    special.add_special_token["bos"] = tokenizer_adds_bos(tokenizer)
    special.add_special_token["eos"] = tokenizer_adds_eos(tokenizer)
    special.chat_template = tokenizer.chat_template or None
    end = end_of_turn_token(tokenizer, tokenizer.chat_template) if tokenizer.chat_template else None
    if end is not None:
        special.special_token_ids["eot"] = tokenizer.convert_tokens_to_ids(end)
    return special


def llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.x RoPE scaling (`rope_type: llama3`), the `rope_freqs` tensor
    llama.cpp divides its rotary frequencies by, computed as its converter computes them (in float64), so the
    tensor is the converter's to the bit. transformers' ROPE_INIT_FUNCTIONS["llama3"] gives the same factors
    to float32 rounding (a few entries differ by up to 2.6e-7 relative, for Llama 3.1-8B's parameters).

    Args:
        params: the config's `rope_parameters`; transformers requires every key read here for `llama3`.
    """
    base = params["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_rope(writer, config, architecture: Architecture) -> np.ndarray | None:
    """Write the RoPE keys; returns the `rope_freqs` tensor a `llama3` scaling needs, else None. The scaling was
    checked before (gguf_arch.check_architecture)."""
    params, local = rope_parameters(config)
    kind = params.get("rope_type", "default")
    dimensions = rope_dimensions(config, architecture)
    writer.add_rope_dimension_count(dimensions)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    if local is not None:  # Gemma 3: the sliding-window layers' own base
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(float(params[key]))
    elif kind == "llama3":
        return llama3_rope_factors(params, dimensions)
    if architecture.partial_rotary and kind != "yarn":  # Phi-3: the converter always writes the original context
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
    return None


def write_attention(writer, config, architecture: Architecture) -> None:
    """Head sizes, soft-capping and sliding windows, as the converter writes them for the architecture."""
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if architecture.soft_capping:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    elif architecture.final_soft_capping and getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    layer_types = getattr(config, "layer_types", None)
    if architecture.layer_windows and layer_types:
        # Which layers slide, one flag a layer, always: llama.cpp reads this array before any default pattern (Gemma
        # 2's is every other layer, with a window of 4096, even where the config has no sliding layer).
        if getattr(config, "sliding_window", None) is not None:
            writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])


# llama.cpp (llama-vocab.cpp) gives a model whose general.name contains one of these Phi-3's tokenizer quirks: it
# strips the whitespace after every special token and </s>, and needs <unk>, <s>, <|endoftext|> and </s> in the vocab.
PHI3_NAMES = ("phi3", "phi-3")
PHI3_UNSTRIPPED = ("<unk>", "<s>", "<|endoftext|>")


def check_name(name: str, tokenizer) -> None:
    """Refuse a `general.name` that would make llama.cpp tokenize differently from the tokenizer.

    Raises:
        UserError: a name llama.cpp takes for Phi-3's while the tokenizer lacks Phi-3's tokens or does not strip
            the whitespace after its special tokens as llama.cpp then would.
    """
    if not any(part in name.lower() for part in PHI3_NAMES):
        return
    vocab = tokenizer.get_vocab()
    missing = [token for token in (*PHI3_UNSTRIPPED, "</s>") if token not in vocab]
    unstripped = [added.content for added in tokenizer.added_tokens_decoder.values()
                  if (added.special or added.content == "</s>") and not added.rstrip
                  and added.content not in PHI3_UNSTRIPPED]
    if missing or unstripped:
        lacks = f"lacks {', '.join(missing)}" if missing else f"keeps the whitespace after {', '.join(unstripped[:3])}"
        raise UserError(f"--gguf: llama.cpp tokenizes a model named {name!r} (a name with 'phi3' or 'phi-3') as "
                        f"Phi-3's tokenizer, which this one is not (it {lacks}); choose an output folder of another "
                        "name (--out)")


def check_exportable(config, tokenizer, out_types: tuple[str, ...], name: str | None = None) -> tuple[str, list[str]]:
    """Refuse a model the GGUF export cannot write, from its config and tokenizer alone: cheap enough to
    run before a merge starts. Returns llama.cpp's name of the tokenizer's pre-tokenizer, and notes on what
    the files will declare differently from the config (gguf_arch.check_architecture).

    Raises:
        UserError: an unknown out type, an architecture or a setting of it llama.cpp would compute differently
            (gguf_arch.check_architecture), another tokenizer kind, a pre-tokenizer llama.cpp does not know, or
            tokenizer ids beyond the embedding rows, or a `name` (the file's general.name) llama.cpp would take for
            Phi-3's.
    """
    check_gguf_types(out_types)
    notes = check_architecture(config)
    if name is not None:
        check_name(name, tokenizer)
    pre = pre_tokenizer_name(tokenizer, tokenizer_spec(tokenizer))
    check_vocabulary_fits(tokenizer, config.vocab_size)
    return pre, notes


@dataclass
class MergedModel:
    """A merged checkpoint folder, loaded once for all its GGUF files: the model whole, in float32."""

    folder: Path
    model: torch.nn.Module
    tokenizer: object

    @property
    def config(self):
        return self.model.config


def load_merged(folder: Path) -> MergedModel:
    return MergedModel(folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                       AutoTokenizer.from_pretrained(folder))


def export_gguf(merged_dir: Path, target: Path, out_type: str = "f16", name: str | None = None) -> None:
    """Write `target` (.gguf) from a merged checkpoint directory (see `write_gguf`)."""
    write_gguf(load_merged(merged_dir), target, out_type, name)


def gguf_tensors(model, architecture: Architecture):
    """(GGUF name, float32 array) of each tensor of `model`, as the converter writes them for the architecture:
    renamed with gguf-py's name map, q/k rows permuted for llama.cpp's LLAMA graph, Gemma's norms + 1, a tied
    head left out (llama.cpp multiplies by the embeddings).

    Raises:
        UserError: a tensor gguf-py's map of the architecture has no name for.
    """
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--gguf: no GGUF name for tensor {hf_name} of {architecture.name}")
        data = tensor.float().numpy()
        if architecture.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads)
        elif architecture.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, kv_heads)
        if architecture.norm_offset and hf_name.endswith("norm.weight"):
            data = data + np.float32(architecture.norm_offset)
        yield name, data


def write_gguf(merged: MergedModel, target: Path, out_type: str = "f16", name: str | None = None) -> None:
    """Write `target` (.gguf) of the merged model. Besides the model, it holds the file's tensors until they
    are written: at most 2 bytes per parameter more (f16).

    Args:
        name: the model's name in the file (`general.name`); none: the folder's name, as llama.cpp's converter
            names it.

    Raises:
        UserError: what `check_exportable` refuses.
    """
    config, tokenizer, merged_dir = merged.config, merged.tokenizer, merged.folder
    name = name or merged_dir.name
    pre, _ = check_exportable(config, tokenizer, (out_type,), name)
    architecture = architecture_of(config)
    tokens, types = vocabulary(tokenizer, config.vocab_size)
    special = special_vocab(merged_dir, tokenizer, config.vocab_size)

    writer = gguf.GGUFWriter(str(target), architecture.name)
    writer.add_name(name)
    writer.add_context_length(context_length(config, architecture)[0])
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    write_attention(writer, config, architecture)
    rope_freqs = write_rope(writer, config, architecture)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if out_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)

    if rope_freqs is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs)
    for tensor_name, data in gguf_tensors(merged.model, architecture):
        add_tensor(writer, tensor_name, data, out_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_tensor(writer, name: str, data: np.ndarray, out_type: str) -> None:
    """One tensor as llama.cpp's converter stores it: 1-D tensors (norms, biases) in float32, matrices in f16 or
    in q8_0 blocks of 32 where the rows divide into them (else f16), or all in float32 (`f32`, for LoRA files)."""
    if data.ndim == 1 or out_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif out_type == "q8_0" and data.shape[-1] % 32 == 0:
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))


# The architectures whose files transformers' GGUF loader reads back as written. Measured on the tiny models of
# tests/conftest.py: Llama and Qwen2 within float16 rounding (max |Δlogit| 3e-4); it fails on Qwen3 (reads no head_dim), Mistral (asks gguf-py
# for a "mistral" map), Gemma (not supported), Phi-3 (pad id), and reads Gemma 2 and 3 wrongly (max |Δlogit| 0.02 and
# 0.57 where float16 rounding gives 2e-4: it ignores query_pre_attn_scalar, the window pattern, the local RoPE base).
TRANSFORMERS_READS = ("llama", "qwen2")


def gguf_parity(reference: list[torch.Tensor], gguf_file: Path, prompts: list[list[int]], model_type: str) -> dict:
    """Max |Δlogit| and mean KL between the merged model's logits on the prompts (`reference`) and the GGUF file's,
    computed by llama.cpp where llama-cpp-python is installed, else by transformers' GGUF loader (whole, in float32;
    freed on return) for the architectures it reads (TRANSFORMERS_READS), else not at all (saying why)."""
    if llama_cpp_available():
        judge, logits = "llama.cpp", llama_cpp_logits(gguf_file, prompts)
    elif model_type in TRANSFORMERS_READS:
        reloaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                        dtype=torch.float32).eval()
        judge, logits = "transformers' GGUF loader", model_logits(reloaded, prompts)
        del reloaded
    else:
        return {"judge": None, "max_abs_logit_diff": None, "mean_kl_nats_per_token": None, "tokens": 0,
                "reason": f"transformers' GGUF loader does not read {model_type} files back as written, and "
                          f"llama-cpp-python is not installed ({INSTALL_HINT})"}
    report = compare_logits(reference, logits)
    return {"judge": judge, "max_abs_logit_diff": report.max_abs_logit_diff,
            "mean_kl_nats_per_token": report.mean_kl, "tokens": report.tokens}


def export_gguf_files(merged_dir: Path, out_types: tuple[str, ...], prompts: list[list[int]], name: str,
                      say=print) -> dict:
    """Write model-<type>.gguf and its Ollama Modelfile into `merged_dir` for each type, each checked against the
    merged model by llama.cpp where llama-cpp-python is installed (logits, and its tokenizer on CHECK_LINES), else
    by transformers' GGUF loader where it reads the architecture (see `gguf_parity`).

    The merged model is loaded once, whole in float32: its logits on the prompts are kept and every file is
    written from it; it is then freed, so that loading a file back to check it is the only model in memory
    (merge_plan.GGUF_HOST_BYTES_PER_PARAMETER).

    Args:
        name: the model's name in the files; `merged_dir` may be a staging folder of another name.

    Returns:
        per type: the file, its size, the parity with the merged model, the llama.cpp check and the Modelfile.
    """
    merged = load_merged(merged_dir)
    reference = model_logits(merged.model, prompts)
    files = {out_type: merged_dir / f"model-{out_type}.gguf" for out_type in out_types}
    for out_type, file in files.items():
        write_gguf(merged, file, out_type, name)
    tokenizer, generation_config, model_type = merged.tokenizer, merged.model.generation_config, merged.config.model_type
    del merged
    results = {}
    for out_type, file in files.items():
        result = {"file": file.name, "bytes": file.stat().st_size, **gguf_parity(reference, file, prompts, model_type)}
        if result["judge"] is None:
            say(f"Wrote {file.name}: not checked against the merged model ({result['reason']})")
        else:
            say(f"Wrote {file.name}: computed by {result['judge']}, max |Δlogit| {result['max_abs_logit_diff']:.3g} "
                "against the merged model")
        result["llama_cpp"] = llama_cpp_tokenization_check(file, tokenizer, say=say)
        result["modelfile"] = write_modelfile(file, tokenizer, generation_config, say=say)
        results[out_type] = result
    return results


def gguf_summary(entry: dict) -> str:
    """One line about an exported file for the merge summary: size, parity, llama.cpp, Modelfile."""
    check = entry["llama_cpp"]
    llama = (f"llama.cpp tokenizes {check['identical']}/{check['lines']} check lines alike" if check["checked"]
             else f"llama.cpp check skipped: {check['reason']}")
    modelfile = entry["modelfile"]["file"] + ("" if entry["modelfile"]["template"] else " (no TEMPLATE)")
    parity = (f"not checked: {entry['reason']}" if entry.get("judge", "") is None else
              f"max |Δlogit| {entry['max_abs_logit_diff']:.3g}, KL {entry['mean_kl_nats_per_token']:.3g}"
              + (f" ({entry['judge']})" if entry.get("judge") else ""))
    return f"{entry['file']}, {entry['bytes'] / 1e6:.0f} MB; {parity}; {llama}; {modelfile}"
