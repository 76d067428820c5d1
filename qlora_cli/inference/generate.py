"""Generation: load a run (4-bit base + adapter, as trained), a merged directory or any model, and answer
prompts with the chat template the model was trained with."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.context import inference_context
from ..data.templates import end_of_turn_token
from ..data.tokenize import encode_prompt
from ..core.errors import UserError
from ..core.models import LoadedModel, load_run, resolve_model_path
from ..core.rundir import is_run_dir
from .sampling import DEFAULT_SAMPLING


def load_plain(reference: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """A full-precision model: a merged directory, a local model, a hub id, a .gguf or the bundled alias;
    computed in `dtype` when given (the caller asked for it)."""
    path = resolve_model_path(reference)
    context = inference_context()
    # Unquantized weights on a CPU stay in float32 by default: bfloat16 would round them, not just the matmuls.
    if dtype is None:
        dtype = torch.float32 if context.device == "cpu" else context.compute_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=context.device_map, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise UserError(f"cannot load model {reference}: {exc}") from None
    return LoadedModel(model.eval(), tokenizer, reference)


def load_for_generation(reference: str) -> LoadedModel:
    path = Path(reference).expanduser()
    if path.is_dir() and is_run_dir(path):
        return load_run(path)
    return load_plain(reference)


def prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat ending in the generation prompt, with BOS exactly as in training."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return conversation_ids(tokenizer, messages)


def conversation_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat ending in the generation prompt, with BOS exactly as in training."""
    return encode_prompt(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids of the model plus the token the chat template closes replies with."""
    return end_token_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None))


def end_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokenizer's EOS id, the generation config's EOS ids (Llama 3.1 lists <|eom_id|> there too) and the
    token the chat template closes replies with."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.chat_template:
        end = end_of_turn_token(tokenizer, tokenizer.chat_template)
        if end is not None:
            ids.add(tokenizer.convert_tokens_to_ids(end))
    return sorted(i for i in ids if i is not None)


def generate(
    loaded: LoadedModel,
    prompts: list[str] | list[list[dict[str, str]]],
    *,
    max_new_tokens: int = DEFAULT_SAMPLING.max_new_tokens,
    temperature: float = DEFAULT_SAMPLING.temperature,
    top_p: float = DEFAULT_SAMPLING.top_p,
    seed: int = DEFAULT_SAMPLING.seed,
    system: str | None = None,
    streamer=None,
) -> list[str]:
    """Answer each prompt (a string, or a whole conversation as messages); left-padded batches,
    sampling when temperature > 0, greedy at 0."""
    tokenizer, model = loaded.tokenizer, loaded.model
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        prompt_ids(tokenizer, p, system) if isinstance(p, str) else conversation_ids(tokenizer, p) for p in prompts
    ]
    longest = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, longest - len(ids):] = torch.tensor(ids)
        attention_mask[row, longest - len(ids):] = 1
    device_ = next(model.parameters()).device
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device_),
            attention_mask=attention_mask.to(device_),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(loaded),
            pad_token_id=pad_id,
            streamer=streamer,
            **sampling,
        )
    return [tokenizer.decode(row[longest:], skip_special_tokens=True).strip() for row in output]
