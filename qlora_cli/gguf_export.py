"""GGUF export of a merged Llama-architecture checkpoint, for llama.cpp and Ollama (f16 or q8_0).

Written with the `gguf` package: tensors renamed with its Llama name map, the query and key projections
permuted into llama.cpp's rotary layout (the inverse of what transformers' GGUF loader undoes), and the
tokenizer (a byte-level BPE `tokenizer.json`, as Llama 3, Qwen2 and SmolLM use) stored as a "gpt2"
vocabulary with its merges and chat template. The export is checked by loading it back with
transformers' GGUF loader and comparing logits with the merged model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

FORMATS = {"f16", "q8_0"}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k row order -> llama.cpp's (the inverse of transformers' `_reverse_permute_weights`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tokenizer_fields(model_dir: Path) -> dict:
    """tokens, token types and merges of a byte-level BPE tokenizer.json."""
    path = model_dir / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"--format gguf: cannot read {path}: {error}") from None
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError("--format gguf: only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM) are supported")
    vocab = dict(model["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    types = [3 if i in special else 1 for i in range(size)]  # 3 = control, 1 = normal
    return {"tokens": tokens, "types": types, "merges": merges}


def export_gguf(merged_dir: Path, target: Path, out_type: str = "f16") -> None:
    """Write `target` (.gguf) from a merged checkpoint directory of a Llama-architecture model.

    Raises:
        UserError: another architecture, another tokenizer kind, or an unknown out_type.
    """
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if out_type not in FORMATS:
        raise UserError(f"--gguf-type: {out_type!r} is not one of {', '.join(sorted(FORMATS))}")
    config = AutoConfig.from_pretrained(merged_dir)
    if config.model_type != "llama":
        raise UserError(f"--format gguf: only Llama-architecture models are supported, not {config.model_type}")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    fields = _tokenizer_fields(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name(merged_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if out_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--format gguf: no GGUF name for tensor {hf_name}")
        data = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        # llama.cpp keeps 1-D tensors (norms, biases) in float32.
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif out_type == "q8_0" and data.shape[-1] % 32 == 0:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_parity(merged_dir: Path, gguf_file: Path, prompts: list[list[int]]) -> dict:
    """Max |Δlogit| and mean KL between the merged model and the GGUF file loaded back by transformers."""
    from transformers import AutoModelForCausalLM

    from .parity import parity

    original = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    report = parity(original, reloaded, prompts)
    return {"max_abs_logit_diff": report.max_abs_logit_diff, "mean_kl_nats_per_token": report.mean_kl, "tokens": report.tokens}
