"""The architectures the GGUF export writes, each as llama.cpp's converter (convert_hf_to_gguf.py) writes it, and
what llama.cpp cannot compute as transformers does, refused with the reason.

One table, `ARCHITECTURES`, holds what differs between them; the names of tensors and keys come from gguf-py's own
tables (`gguf.MODEL_ARCH`, `gguf.get_tensor_name_map`, the writer's `gguf.Keys`). What each row says, and why:

- llama, mistral: llama.cpp's LLAMA architecture; the query and key rows (and biases) permuted into its rotary
  layout (`permute_qk`), as the converter's LlamaModel does;
- qwen2 (Qwen2, Qwen2.5): q/k/v biases, NEOX rotary layout (no permutation);
- qwen3: q_norm/k_norm per head, no biases;
- gemma, gemma2, gemma3_text: Gemma's RMSNorm computes x * (1 + w) where llama.cpp's multiplies by w, so every
  norm weight is written + 1 (`norm_offset`), as the converter does; llama.cpp scales the embeddings by
  sqrt(hidden) itself; Gemma and Gemma 2 always take the output head from the embeddings (`head_from_embeddings`);
  Gemma 2 writes both soft-capping values and its post-norms; Gemma 2 and 3 write the sliding window and which
  layers use it; Gemma 3 its local RoPE base and q/k norms;
- phi3: the fused qkv_proj and gate_up_proj are the tensors llama.cpp reads (attn_qkv, ffn_up: it splits them,
  gate first, as transformers does); partial rotary dimensions.

Imports nothing heavier than gguf, and reads configs only: the command line refuses before a merge starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from ..core.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """What the GGUF export writes differently for one transformers `model_type`."""

    arch: gguf.MODEL_ARCH
    activation: str  # the only MLP activation llama.cpp's graph of this architecture computes
    permute_qk: bool = False  # llama.cpp's LLAMA graph rotates interleaved pairs: rows reordered
    norm_offset: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm scales by 1 + w)
    head_from_embeddings: bool = False  # llama.cpp ignores output.weight and multiplies by token_embd
    soft_capping: bool = False  # Gemma 2: attention and final logit soft-capping keys, both required
    final_soft_capping: bool = False  # Gemma 3: the final logit soft-capping key where the config has one
    layer_windows: bool = False  # per-layer sliding windows written (Gemma 2, 3); else llama.cpp attends to all
    local_rope: bool = False  # Gemma 3: sliding layers have their own RoPE base
    attention_scale_27b_layers: int | None = None  # Gemma 2/3: llama.cpp scales queries by 1/sqrt(head_dim),
    # except for the layer count of the 27B model, where by 1/sqrt(hidden / heads)
    partial_rotary: bool = False  # Phi-3 family: rope over a fraction of each head
    llama3_rope: bool = False  # the rope_freqs tensor of Llama 3.x scaling is read by llama.cpp's LLAMA only

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, "silu", permute_qk=True, llama3_rope=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, "silu", permute_qk=True, llama3_rope=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, "silu"),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3, "silu"),
    "gemma": Architecture(gguf.MODEL_ARCH.GEMMA, "gelu_pytorch_tanh", norm_offset=1.0, head_from_embeddings=True),
    "gemma2": Architecture(gguf.MODEL_ARCH.GEMMA2, "gelu_pytorch_tanh", norm_offset=1.0, head_from_embeddings=True,
                           soft_capping=True, layer_windows=True, attention_scale_27b_layers=46),
    "gemma3_text": Architecture(gguf.MODEL_ARCH.GEMMA3, "gelu_pytorch_tanh", norm_offset=1.0, final_soft_capping=True,
                                layer_windows=True, local_rope=True, attention_scale_27b_layers=62),
    "phi3": Architecture(gguf.MODEL_ARCH.PHI3, "silu", partial_rotary=True),
}

# Architectures people fine-tune that are refused, with the reason (others get the list of supported ones).
REFUSED = {
    "gemma3": "a Gemma 3 with its vision tower (Gemma3ForConditionalGeneration); llama.cpp needs the text model and "
              "the vision projector as two files. Fine-tune the text-only Gemma3ForCausalLM (model_type gemma3_text)",
    "mixtral": "a mixture of experts: the export writes dense models only",
    "qwen2_moe": "a mixture of experts: the export writes dense models only",
    "qwen3_moe": "a mixture of experts: the export writes dense models only",
    "phimoe": "a mixture of experts: the export writes dense models only",
    "gemma3n": "Gemma 3n's per-layer embeddings and AltUp are not written by this export",
    "phi": "Phi-1/Phi-2 (parallel attention and MLP, LayerNorm) are not written by this export",
}

SUPPORTED_ROPE = ("default", "linear", "yarn")


def architecture_of(config) -> Architecture:
    """The row of `config.model_type`.

    Raises:
        UserError: an architecture the export does not write, with the reason where there is a particular one.
    """
    kind = config.model_type
    if kind in ARCHITECTURES:
        return ARCHITECTURES[kind]
    reason = REFUSED.get(kind, "the GGUF export writes " + ", ".join(ARCHITECTURES) + " models")
    raise UserError(f"--gguf: {kind} is not supported: {reason}. Convert the merged folder with llama.cpp's "
                    "convert_hf_to_gguf.py instead")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config) -> tuple[dict, dict | None]:
    """The RoPE parameters of full-attention layers, and of sliding-window layers where they have their own (Gemma 3);
    transformers (5.x) standardizes legacy `rope_scaling` and a top-level `rope_theta` into `rope_parameters`."""
    params = config.rope_parameters
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    return params, None


def rope_dimensions(config, architecture: Architecture) -> int:
    """How many dimensions of each head rotate: all, or Phi-3's `partial_rotary_factor` of the hidden size per head,
    as the converter computes it."""
    full, _ = rope_parameters(config)
    if architecture.partial_rotary:
        factor = full.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        return int(factor * config.hidden_size) // config.num_attention_heads
    return head_dim(config)


def sliding_window(config) -> int | None:
    """The attention window transformers applies in some layer, or None where every layer sees the whole context."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def context_length(config, architecture: Architecture) -> tuple[int, str | None]:
    """The context length the file declares, and why it is shorter than the model's where it is.

    Where transformers attends within a window in some layer and llama.cpp's graph of the architecture attends to
    the whole context (Mistral 7B v0.1, Phi-3-mini-4k, Qwen2 with use_sliding_window), the two compute the same
    only for contexts up to the window: the file declares that much.
    """
    context = int(config.max_position_embeddings)
    window = sliding_window(config)
    if architecture.layer_windows or window is None or window >= context:
        return context, None
    return window, (f"the model attends within a window of {window} tokens, which llama.cpp's {architecture.name} "
                    f"graph does not do: the file declares a context of {window} tokens (not {context}), within "
                    "which both compute alike")


def check_architecture(config) -> list[str]:
    """Refuse what llama.cpp would compute differently from transformers, from the config alone; returns notes on
    what the file will say differently from the config (a shorter context).

    Raises:
        UserError: an unsupported architecture, activation, RoPE scaling, attention scale, soft-capping, untied
            head llama.cpp would ignore, or bidirectional attention.
    """
    architecture = architecture_of(config)
    kind = config.model_type
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation != architecture.activation:
        raise UserError(f"--gguf: {kind} with the {activation!r} activation: llama.cpp computes "
                        f"{architecture.activation!r} for {architecture.name}")
    full, local = rope_parameters(config)
    kind_of_rope = full.get("rope_type", "default")
    supported = SUPPORTED_ROPE + (("llama3",) if architecture.llama3_rope else ())
    if kind_of_rope not in supported:
        raise UserError(f"--gguf: RoPE scaling {kind_of_rope!r} is not supported in the GGUF export of {kind} "
                        f"(supported: {', '.join(supported)})" + _rope_reason(kind_of_rope))
    if local is not None and local.get("rope_type", "default") != "default":
        raise UserError(f"--gguf: RoPE scaling {local['rope_type']!r} of the sliding-window layers is not supported: "
                        "llama.cpp scales only the full-attention layers of " + architecture.name)
    if architecture.head_from_embeddings and not config.tie_word_embeddings:
        raise UserError(f"--gguf: this {kind} model has an output head of its own (tie_word_embeddings: false, as a "
                        f"LoRA on lm_head makes it), which llama.cpp's {architecture.name} ignores: it multiplies by "
                        "the embeddings. Train without a LoRA on lm_head")
    if getattr(config, "use_bidirectional_attention", False):
        raise UserError(f"--gguf: {kind} with bidirectional attention (an embedding model) is not a causal LM")
    if architecture.attention_scale_27b_layers is not None:
        _check_attention_scale(config, architecture)
    if architecture.soft_capping:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None) is None:
                raise UserError(f"--gguf: {kind} without {key}: llama.cpp's {architecture.name} always soft-caps "
                                "(50 and 30 when the file says nothing)")
    elif getattr(config, "attn_logit_softcapping", None) is not None:
        raise UserError(f"--gguf: {kind} with attn_logit_softcapping: llama.cpp's {architecture.name} does not cap "
                        "attention logits")
    _, note = context_length(config, architecture)
    return [note] if note else []


def _rope_reason(kind: str) -> str:
    if kind in ("longrope", "su"):
        return ("; llama.cpp picks the long or the short factors once, by the context size it is started with, "
                "where transformers picks them by each sequence's length, so the two compute differently")
    if kind == "dynamic":
        return "; llama.cpp has no dynamic NTK scaling"
    return ""


def _check_attention_scale(config, architecture: Architecture) -> None:
    """llama.cpp's Gemma 2/3 scale queries by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads) at the 27B model's layer
    count, whatever the config's `query_pre_attn_scalar` says."""
    layers = config.num_hidden_layers
    expected = (config.hidden_size // config.num_attention_heads if layers == architecture.attention_scale_27b_layers
                else head_dim(config))
    if config.query_pre_attn_scalar != expected:
        raise UserError(f"--gguf: {config.model_type} with query_pre_attn_scalar {config.query_pre_attn_scalar}: "
                        f"llama.cpp scales the queries of a {layers}-layer {architecture.name} by 1/sqrt({expected})")
