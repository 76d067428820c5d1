"""What a merge needs, memory and disk, from the model's config alone, before anything loads.

The merge (merge.py, streaming.py) never holds the model whole: it holds the adapter and the parity prompts'
logits (the trained model's and the merged one's), plus, one phase at a time,
- the trained model's modules outside the decoder layers, in the compute dtype (embeddings, head, final norm);
- one quantized decoder layer of the trained model, with the working set of the tensor of it being merged (its
  dequantized float32 weight, its float32 LoRA delta, the result in the output dtype) and the output shard
  being filled;
- the merged model's modules outside the layers, or one of its layers, in the output dtype.
Weights are read from the checkpoints a block of READ_BLOCK_BYTES at a time. On a GPU the weights compute
there, and the host holds the output shard and the block being read. A GGUF export (--gguf) comes after the
merge and does hold a model whole, in float32: the merged one while it writes the files, then each file loaded
back to check it (GGUF_HOST_BYTES_PER_PARAMETER); with it, that is usually the peak. The counts are the tensors' own sizes;
what the allocator and the operating system add on top is not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.errors import UserError
from ..plan.configs import OUTPUT_HEAD, ModelShapes, model_shapes
from ..plan.memory import CUDA_CONTEXT_BYTES, kept_parameter_count, lora_parameter_count, lora_targets, quantized_linear_bytes
from ..plan.sizes import GiB, format_bytes
from .gguf_types import GGUF_BYTES_PER_PARAMETER
from .streaming import READ_BLOCK_BYTES

# Resident memory of a process that has imported torch 2.13, transformers 5.24, peft 0.21 and bitsandbytes
# 0.50: 0.44 GiB measured on CPU (VmRSS after the imports), rounded up.
LIBRARIES_BYTES = GiB // 2
# export/gguf.py holds the merged model whole in float32 while it writes the files (plus a file's tensors, at
# most 2 bytes per parameter), then frees it and loads each file back (transformers' GGUF loader holds the
# dequantized float32 tensors beside the float32 model it fills). Measured with /usr/bin/time -v on a
# 134.5 M-parameter model, f16 and q8_0: peak RSS 7.9 bytes per parameter above the libraries.
GGUF_HOST_BYTES_PER_PARAMETER = 8
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class MergeSettings:
    """What decides the sizes, besides the model's shapes."""

    bits: int  # of the trained base: 4, 8 or 16
    double_quant: bool
    lora_r: int
    target_modules: object  # "all-linear" or a list of names
    compute_bytes: int  # the trained model's compute dtype
    out_bytes: int  # the merged checkpoint's dtype
    max_shard_bytes: int
    prompt_tokens: int  # all parity prompts together
    on_gpu: bool
    gguf_types: tuple[str, ...] = ()


@dataclass
class MergeNeeds:
    """Peak bytes of the merge: on the host, on the GPU (None on a CPU), and on disk, with what dominates."""

    host_bytes: int
    device_bytes: int | None
    disk_bytes: int
    parameters: int
    parts: list[tuple[str, int]] = field(default_factory=list)  # the largest terms (the peak is the largest phase)

    def describe(self) -> str:
        memory = f"{format_bytes(self.host_bytes)} of memory"
        if self.device_bytes is not None:
            memory += f" and {format_bytes(self.device_bytes)} of GPU memory"
        parts = ", ".join(f"{what} {format_bytes(size)}" for what, size in self.parts)
        return f"about {memory} ({parts}) and {format_bytes(self.disk_bytes)} of disk"


def parameter_count(shapes: ModelShapes) -> int:
    return kept_parameter_count(shapes) + shapes.layers * sum(i * o for i, o in shapes.linears().values())


def merge_needs(config: Mapping, settings: MergeSettings) -> MergeNeeds:
    """The memory and disk a merge with `settings` needs for the model of `config` (a config.json dict).

    Raises:
        UserError: the config lacks the shapes (see plan.model_shapes), or names no LoRA target of this model.
    """
    s, shapes = settings, model_shapes(config)
    targets = lora_targets(shapes, s.target_modules)
    if shapes.tied and OUTPUT_HEAD in targets:  # the merge unties an adapted head (merge.merged_config)
        shapes = dataclasses.replace(shapes, tied=False)
    linears = shapes.linears()
    parameters = parameter_count(shapes)
    largest_linear = max(i * o for i, o in linears.values())
    embedding = shapes.vocab * shapes.hidden
    outside_layers = embedding * (1 if shapes.tied else 2) + shapes.hidden
    layer_kept = (kept_parameter_count(shapes) - outside_layers) // shapes.layers  # norms, biases

    adapter = 4 * lora_parameter_count(shapes, targets, s.lora_r)  # float32

    def outer(weight_bytes: int) -> int:
        """The modules outside the decoder layers, in memory together; weights are read a block at a time."""
        return outside_layers * weight_bytes + READ_BLOCK_BYTES

    def layer(weight_bytes: int, quantized: bool) -> int:
        """One decoder layer in memory. A quantized weight is read whole (in the compute dtype) before it is
        quantized, and bitsandbytes dequantizes it again for each matmul."""
        if quantized:
            weights = sum(quantized_linear_bytes(i, o, s.bits, s.double_quant) for i, o in linears.values())
            transient = 2 * largest_linear * weight_bytes
        else:
            weights = sum(i * o for i, o in linears.values()) * weight_bytes
            transient = READ_BLOCK_BYTES
        return weights + layer_kept * weight_bytes + transient

    trained_layer = layer(s.compute_bytes, quantized=s.bits in (4, 8))
    total_out = parameters * s.out_bytes
    shard = min(total_out, max(s.max_shard_bytes, embedding * s.out_bytes))
    # The tensor being merged, while its layer is in memory: its dequantized weight and LoRA delta in float32,
    # then the output cast.
    working = largest_linear * (8 + s.out_bytes) + READ_BLOCK_BYTES
    logits = 2 * s.prompt_tokens * shapes.vocab * 4
    gguf_host = GGUF_HOST_BYTES_PER_PARAMETER * parameters if s.gguf_types else 0
    # The largest of the phases: the trained model's modules outside the layers (before and after its layers),
    # each of its layers with the merge of that layer, the trained model run again in float32 (the parity
    # reference), the merged model read back.
    reference_layer = layer(FLOAT32_BYTES, quantized=s.bits in (4, 8))
    weights_phase = max(outer(s.compute_bytes), trained_layer + working, outer(FLOAT32_BYTES), reference_layer,
                        outer(s.out_bytes), layer(s.out_bytes, quantized=False))

    if s.on_gpu:
        device = CUDA_CONTEXT_BYTES + adapter + weights_phase
        host = LIBRARIES_BYTES + logits + max(shard + READ_BLOCK_BYTES, gguf_host)
        parts = [("one output shard", shard), ("GPU: one layer or the embeddings", weights_phase),
                 ("GPU: the adapter", adapter)]
    else:
        device = None
        merging = trained_layer + working + shard
        host = LIBRARIES_BYTES + adapter + logits + max(weights_phase, merging, gguf_host)
        parts = [("one output shard", shard), ("one layer or the embeddings", weights_phase), ("the adapter", adapter)]
    if gguf_host:
        parts.append(("GGUF export, which loads the merged model whole", gguf_host))
    parts.append(("libraries", LIBRARIES_BYTES))

    disk = total_out + int(sum(GGUF_BYTES_PER_PARAMETER[kind] * parameters for kind in s.gguf_types))
    return MergeNeeds(host_bytes=int(host), device_bytes=None if device is None else int(device), disk_bytes=disk,
                      parameters=parameters, parts=parts)


def check_fits(needs: MergeNeeds, *, host_available: int, device_available: int | None, disk_free: int,
               disk_folder: str) -> None:
    """Refuse a merge that would not fit, with the figures.

    Raises:
        UserError: naming what is short, what the merge needs and what there is.
    """
    short = []
    if needs.host_bytes > host_available:
        short.append(f"{format_bytes(host_available)} of memory available")
    if needs.device_bytes is not None and device_available is not None and needs.device_bytes > device_available:
        short.append(f"{format_bytes(device_available)} of GPU memory free")
    # A little room beside the weights for the index, the config and the tokenizer.
    if needs.disk_bytes * 1.02 + 64 * 2**20 > disk_free:
        short.append(f"{format_bytes(disk_free)} of disk free in {disk_folder}")
    if short:
        raise UserError(
            f"the merge needs {needs.describe()}, and there is only {' and '.join(short)}; "
            "lower --max-shard-size to hold less of the output at once, choose another --out, or free some"
        )
