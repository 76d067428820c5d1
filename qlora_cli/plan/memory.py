"""Memory planning: will a recipe fit on a GPU (and if not, what to change: plan/advice.py) — decided before
anything loads.

Everything here works from the model's `config.json` alone (a directory holding nothing else will do), so a
65B run can be planned offline on a laptop. Nothing imports torch. Every number is bytes per device, for the
CUDA GPU the run is planned for, not for this machine: `compute_dtype: auto` therefore counts as bfloat16.

What is counted follows what `qlora train` does (train/model.py's load_model, train/run.py's training_arguments):

- the base model loaded with bitsandbytes (4-bit NF4/FP4, 8-bit LLM.int8) or in 16-bit;
- `peft.prepare_model_for_kbit_training`, which upcasts every non-quantized parameter to float32;
- LoRA adapters, which peft keeps in float32, trained with the recipe's optimizer;
- the Trainer's bf16/fp16 autocast, gradient checkpointing (non-reentrant, one checkpoint per decoder
  layer) and SDPA attention.

The weight, LoRA and optimizer numbers are exact counts (tests compare them with models really loaded in
4-bit); activations are a per-tensor account of what autograd saves, checked on CPU against a real forward;
the overhead is an estimate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.errors import Problem, UserError
from ..core.recipe import LoraSection, Recipe, with_change
from ..train.loss_spec import chunk_rows
from ..train.methods import COSTS
from .advice import advice
from .configs import LINEAR_NAMES, OUTPUT_HEAD, ModelShapes, model_shapes
from .sizes import GiB

# bitsandbytes' 4-bit layout (bitsandbytes.functional.quantize_4bit): one absmax per block of 64 weights;
# with double quantization the absmax values are themselves quantized to 8 bits in blocks of 256.
BLOCK_4BIT = 64
NESTED_BLOCK = 256
# The per-layer lookup tables that `QuantState.as_dict(packed=True)` carries: the 16-entry NF4/FP4 code
# and, with double quantization, the 256-entry dynamic code of the nested absmax, both float32.
CODE_4BIT_BYTES = 16 * 4
NESTED_CODE_BYTES = 256 * 4

# bitsandbytes' 8-bit optimizers (Optimizer2State): tensors with fewer elements than this keep 32-bit state;
# larger ones keep each of the two states in 8 bits with one float32 absmax per block of 256.
OPTIMIZER_8BIT_MIN_SIZE = 4096
OPTIMIZER_8BIT_BLOCK = 256

# The CUDA context, cuBLAS/cuDNN workspaces and the kernels of torch and bitsandbytes: 0.5-1 GiB on current
# drivers and GPUs (what nvidia-smi shows for a process that has only initialised CUDA and run a matmul).
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
# Memory the caching allocator reserves but cannot reuse, for tensors allocated and freed every step.
# Weights are allocated once at load and never freed, so they cannot fragment the pool, and paged optimizer
# state lives outside it (CUDA unified memory); so the fraction applies to LoRA parameters, gradients,
# unpaged optimizer state and activations only. 10% is the usual gap between `max_memory_reserved` and
# `max_memory_allocated` in transformer training; it is an estimate, not a measurement.
FRAGMENTATION = 0.10


def quantized_linear_bytes(in_features: int, out_features: int, bits: int, double_quant: bool = True,
                           dtype_bytes: int = 2) -> int:
    """Bytes of one frozen linear weight as bitsandbytes stores it (no bias).

    4-bit (QLoRA paper, section 3; bitsandbytes.functional.quantize_4bit): two weights per byte, plus the
    quantization constants over the flattened weight in blocks of 64:
      - plain: one float32 absmax per block, 32/64 = 0.5 bit per weight;
      - double quantization: the absmax in 8 bits (8/64) plus one float32 second-level constant per 256
        blocks (32/(64*256)): 0.127 bit per weight;
      plus the code tables (`quant_map`, and `nested_quant_map` with double quantization).
    8-bit (LLM.int8, Linear8bitLt): one byte per weight plus one float32 scale per output row (SCB).
    16-bit: `dtype_bytes` per weight.
    """
    n = in_features * out_features
    if bits == 4:
        blocks = math.ceil(n / BLOCK_4BIT)
        if double_quant:
            constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + CODE_4BIT_BYTES + NESTED_CODE_BYTES
        else:
            constants = 4 * blocks + CODE_4BIT_BYTES
        return math.ceil(n / 2) + constants
    if bits == 8:
        return n + 4 * out_features
    return n * dtype_bytes


def kept_parameter_count(shapes: ModelShapes) -> int:
    """Parameters that stay unquantized: embeddings, the output head unless tied, RMSNorm weights, biases.

    transformers never quantizes the output head or embeddings (`get_keys_to_not_convert`); biases of
    quantized linears stay ordinary parameters too.
    """
    s = shapes
    count = s.vocab * s.hidden * (1 if s.tied else 2)
    count += (s.block_norms * s.layers + 1) * s.hidden  # the norms of each block (input, post-attention, ...), the final norm
    linears = s.linears()
    per_block = sum(linears[name][1] for name in s.attention_bias)
    if s.mlp_bias:
        per_block += sum(linears[name][1] for name in ("gate_proj", "up_proj", "down_proj"))
    if s.qk_norm:
        per_block += 2 * s.head_dim
    return count + per_block * s.layers


# ---------------------------------------------------------------------------------------------
# LoRA and the optimizer

def lora_targets(shapes: ModelShapes, target_modules) -> dict[str, tuple[int, int]]:
    """The linear layers of one block that get adapters, with (in, out); `lm_head` if named, too.

    `all-linear` is peft's: every linear layer except the output head. Names match by their last dotted
    part, as peft's suffix matching does for these module names.

    Raises:
        UserError: when no name in the list is a linear layer of this model.
    """
    linears = shapes.linears()
    if target_modules == "all-linear":
        return dict(linears)
    wanted = {str(name).rsplit(".", 1)[-1] for name in target_modules}
    chosen = {name: dims for name, dims in linears.items() if name in wanted}
    if OUTPUT_HEAD in wanted:
        chosen[OUTPUT_HEAD] = (shapes.hidden, shapes.vocab)
    if not chosen:
        raise UserError(
            Problem(
                f"none of {', '.join(sorted(wanted))} is a linear layer of this model; "
                f"its linear layers are {', '.join(LINEAR_NAMES)} (and {OUTPUT_HEAD})",
                key="lora.target_modules",
            )
        )
    return chosen


def _lora_tensor_sizes(shapes: ModelShapes, targets: dict[str, tuple[int, int]], r: int) -> list[tuple[int, int]]:
    """(elements of one LoRA matrix, how many of them) for A (r x in) and B (out x r) of each target."""
    sizes = []
    for name, (fan_in, fan_out) in targets.items():
        copies = 1 if name == OUTPUT_HEAD else shapes.layers
        sizes += [(r * fan_in, copies), (fan_out * r, copies)]
    return sizes


# Modules `lora.modules_to_save` can name that the planner counts, with their parameters (last dotted part).
def saved_module_parameters(shapes: ModelShapes, name: str) -> int | None:
    """Parameters of the module `name` that `lora.modules_to_save` copies and trains in full, or None where the
    planner does not know it: the output head, the input embedding, the final norm."""
    return {OUTPUT_HEAD: shapes.vocab * shapes.hidden, "embed_tokens": shapes.vocab * shapes.hidden,
            "norm": shapes.hidden}.get(str(name).rsplit(".", 1)[-1])


def variant_tensor_sizes(shapes: ModelShapes, targets: dict[str, tuple[int, int]], lora: LoraSection) -> list[tuple[int, int]]:
    """(elements, how many) of what trains beside the LoRA matrices: DoRA's magnitude vector (one value per output
    row of each adapted linear) and the full copies of `lora.modules_to_save` (each trained in float32, with a
    gradient and optimizer states like the adapter's).

    Raises:
        UserError: a module to save that the planner cannot size.
    """
    sizes = []
    if lora.use_dora:
        sizes += [(fan_out, 1 if name == OUTPUT_HEAD else shapes.layers) for name, (_, fan_out) in targets.items()]
    for name in lora.modules_to_save or []:
        count = saved_module_parameters(shapes, name)
        if count is None:
            raise UserError(Problem(f"the memory plan cannot size the module {name!r}; it counts modules_to_save of "
                                    f"{OUTPUT_HEAD}, embed_tokens and norm", key="lora.modules_to_save"))
        sizes.append((count, 1))
    return sizes


def optimizer_state_bytes(tensor_sizes: list[tuple[int, int]], optimizer: str) -> int:
    """AdamW's two states (exp_avg, exp_avg_sq) for tensors of the given (elements, count).

    32-bit (`adamw_torch`, `paged_adamw_32bit`): 2 x 4 bytes per parameter.
    8-bit (`paged_adamw_8bit`, bitsandbytes blockwise): 2 x (1 byte + a float32 absmax per 256) per parameter
    for tensors of 4096 elements or more; smaller tensors keep 32-bit state.
    """
    total = 0
    for elements, count in tensor_sizes:
        if optimizer.endswith("8bit") and elements >= OPTIMIZER_8BIT_MIN_SIZE:
            per_tensor = 2 * (elements + 4 * math.ceil(elements / OPTIMIZER_8BIT_BLOCK))
        else:
            per_tensor = 8 * elements
        total += per_tensor * count
    return total


# ---------------------------------------------------------------------------------------------
# Activations

@dataclass(frozen=True)
class ActivationEstimate:
    """What the forward and backward pass hold per device, for `tokens` = batch x sequence length.

    Attributes:
        per_token_per_layer: bytes autograd saves for backward in one decoder layer, per token.
        boundary_per_token_per_layer: with checkpointing, the layer input each checkpoint keeps, per token.
        head_per_token: saved after the last layer for the loss.
        logits_transient_per_token: also alive at the loss, per token (the model's own loss only).
        cast_bytes: autocast's 16-bit copies of float32 weights, held until backward (token-independent).
        workspace_bytes: token-independent memory outside autograd, alive in forward and backward: the largest
            base weight dequantized for one matmul and, with the chunked loss, the cached 16-bit output head.
        loss_chunk_bytes: with the chunked loss, one chunk of logits while the loss runs (token-independent).
    """

    tokens: int
    layers: int
    per_token_per_layer: int
    boundary_per_token_per_layer: int
    head_per_token: int
    logits_transient_per_token: int
    cast_bytes: int
    workspace_bytes: int
    loss_chunk_bytes: int = 0

    def saved_for_backward(self) -> int:
        """Without checkpointing: everything autograd holds when the forward ends (what a saved-tensor
        hook sees), without the transients."""
        return self.tokens * (self.layers * self.per_token_per_layer + self.head_per_token) + self.cast_bytes

    def full(self) -> int:
        return (self.saved_for_backward() + self.tokens * self.logits_transient_per_token + self.workspace_bytes
                + self.loss_chunk_bytes)

    def checkpointed(self) -> int:
        """The larger of two moments: the loss, at the end of the forward (the layer input of every
        checkpoint, what the head saved, the loss's transients, autocast's weight copies), and the
        backward of the last layer, recomputed in full (the checkpoints and that layer's saved tensors;
        autocast's copies are gone once its forward context closes). scripts/measure_plan.py compares
        the plan with every allocation of a real run.
        """
        checkpoints = self.tokens * (self.layers * self.boundary_per_token_per_layer + self.head_per_token)
        at_loss = (checkpoints + self.tokens * self.logits_transient_per_token + self.cast_bytes
                   + self.loss_chunk_bytes)
        in_backward = checkpoints + self.tokens * self.per_token_per_layer
        return max(at_loss, in_backward) + self.workspace_bytes


def compute_dtype_bytes(setting: str) -> int:
    """Bytes per element of the compute dtype on a GPU: `auto` is bfloat16 there (core/context.py's
    choose_compute_dtype)."""
    return 4 if setting == "float32" else 2


def activation_estimate(shapes: ModelShapes, recipe: Recipe, *, compute_bytes: int | None = None,
                        sharded: bool = False) -> ActivationEstimate:
    """The activation account for the recipe's batch and sequence length (see ActivationEstimate).

    c = compute dtype bytes; a = bytes of the residual stream, which is float32 (4) for a quantized base
    because prepare_model_for_kbit_training upcasts the embeddings and norms, and c for a 16-bit base.
    Under bf16/fp16 autocast (c < 4) matmul inputs are cast to c; with float32 compute nothing is cast.

    Per token per decoder layer, the tensors autograd saves (checked against a saved-tensor hook on CPU):
      - the two RMSNorms' inputs (the residual stream): 2a*h, and their rsqrt: 2 x 4 bytes;
      - a 4-bit base linear saves nothing (bitsandbytes' MatMul4Bit keeps only the packed weight, as no
        weight gradient is needed); an 8-bit one saves its input A (shared by the linears that read it);
      - each LoRA adapter saves its input in c (a separate copy per adapter, from autocast's cast or
        dropout), a 1-byte dropout mask if lora.dropout > 0, and the r-wide output of lora_A: c*(in + r);
        with float32 compute and no dropout the adapter saves the very tensor it reads (no copy);
      - SDPA saves q, k, v, its output and a float32 logsumexp per head, never the s x s scores:
        c*(2*q_dim + 2*kv) + 4*heads, where kv = q_dim when a padding mask makes transformers repeat the
        key/value heads (grouped-query attention runs natively only without a mask); with a mask (batch > 1
        or packing) the mask's c-typed bias is saved too: c*s;
      - the MLP: SiLU saves the gate output, the product saves SiLU's output and the up output: 3a*i.
    After the last layer, with the chunked loss on trained positions (train/loss.py's head_only_loss, used when the
    logits are a plain output projection that LoRA does not adapt, and not under FSDP): the final norm's
    input and rsqrt, a*h + 4, and the hidden-state gradient the loss computes in its forward, a*h,
    counting every token as trained (an upper bound); no logits outlive their chunk. With the model's own loss instead: the final
    norm's input a*h + 4, the log-softmax output 4*V, and while the loss runs its gradient 4*V and (with
    autocast) the c-typed logits c*V.

    Token-independent, with autocast: its weight-cast cache keeps a c copy of every float32 LoRA weight
    until the forward ends, c * LoRA parameters, and the float32 output head is cast for its matmul and
    saved for backward: c*V*h. Transient: one base weight dequantized for its matmul (bitsandbytes
    dequantizes 4-bit weights to c; 8-bit ones to the input's dtype in backward).
    """
    s = shapes
    quant, lora, training, data = recipe.quantization, recipe.lora, recipe.training, recipe.data
    c = compute_bytes or compute_dtype_bytes(quant.compute_dtype)
    a = 4 if quant.bits in (4, 8) else c
    autocast = c < 4
    dropout = lora.dropout > 0
    # A preference pair trains two sequences; a reference pass (no gradients) adds only its transients.
    rows = training.batch_size * COSTS[training.method].sequences
    masked = rows > 1 or data.packing
    seq = data.max_seq_len
    targets = lora_targets(s, lora.target_modules)
    linears = s.linears()

    # The tensors the linears of a block read: name -> (width, dtype bytes, already saved by whatever made it),
    # and which linear reads which. A tensor saved by several readers is stored once.
    sources = {
        "norm1": (s.hidden, a, False),
        "attention": (s.q_dim, c, True),  # SDPA's output, saved by SDPA itself
        "norm2": (s.hidden, a, False),
        "product": (s.intermediate, a, False),
    }
    reads = {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "o_proj": "attention",
             "gate_proj": "norm2", "up_proj": "norm2", "down_proj": "product"}
    kept_sources: set[str] = set()
    copies = 0
    for name, source in reads.items():
        if quant.bits == 8:
            kept_sources.add(source)
        if name in targets:
            fan_in = linears[name][0]
            if not dropout and not autocast:
                kept_sources.add(source)
            else:
                copies += c * fan_in + (fan_in if dropout else 0)
            copies += c * lora.r
    inputs = sum(width * dtype for name, (width, dtype, saved) in sources.items()
                 if name in kept_sources and not saved)
    kv = s.q_dim if masked and s.kv_heads != s.heads else s.kv_dim
    attention = c * (2 * s.q_dim + 2 * kv) + 4 * s.heads + (c * seq if masked else 0)
    per_layer = 2 * a * s.hidden + 2 * 4 + inputs + copies + attention + 3 * a * s.intermediate

    chunked_loss = s.plain_head and OUTPUT_HEAD not in targets and not sharded
    head_cast = c * s.vocab * s.hidden if autocast and a > c else 0  # the output head was upcast to float32
    if chunked_loss:
        head = 2 * a * s.hidden + 4
        transient = 0
    else:
        head = a * s.hidden + 4 + 4 * s.vocab
        if OUTPUT_HEAD in targets:  # its adapter reads the final norm's output, which nothing else saves
            shared = not dropout and not autocast
            head += (a * s.hidden if shared else c * s.hidden + (s.hidden if dropout else 0)) + c * lora.r
        transient = 4 * s.vocab + (c * s.vocab if autocast else 0)

    cast = c * lora_parameter_count(s, targets, lora.r) if autocast else 0
    largest = max(fan_in * fan_out for fan_in, fan_out in linears.values())
    workspace = {4: c, 8: a}.get(quant.bits, 0) * largest
    loss_chunk = 0
    if chunked_loss:  # float32 logits of one chunk, with the c-typed matmul output and gradient under autocast
        chunk = min(rows * seq, chunk_rows(s.vocab))
        loss_chunk = chunk * s.vocab * (4 + (2 * c if autocast else 0))
        workspace += head_cast
    else:
        cast += head_cast

    return ActivationEstimate(
        tokens=rows * seq,
        layers=s.layers,
        per_token_per_layer=per_layer,
        boundary_per_token_per_layer=a * s.hidden,
        head_per_token=head,
        logits_transient_per_token=transient,
        cast_bytes=cast,
        workspace_bytes=workspace,
        loss_chunk_bytes=loss_chunk,
    )


def lora_parameter_count(shapes: ModelShapes, targets: dict[str, tuple[int, int]], r: int) -> int:
    """r * (in + out) per adapted linear: A is r x in, B is out x r."""
    return sum(elements * count for elements, count in _lora_tensor_sizes(shapes, targets, r))


# ---------------------------------------------------------------------------------------------
# The plan

@dataclass
class MemoryPlan:
    """Peak memory per device for a training run, by part, in bytes.

    `total_bytes` is everything; `pageable_bytes` is the part a paged optimizer keeps in CUDA unified memory,
    which the driver moves to CPU RAM when the GPU runs short (the QLoRA paper's paged optimizers), so only
    `resident_bytes` = total - pageable must fit on the device. `fits` compares that with the device memory.
    `allocated_bytes` = resident - overhead is the tensors alone: what `torch.cuda.max_memory_allocated`
    measures, which sees neither the CUDA context nor the allocator's cached blocks (nor paged states).
    """

    quantized_weights_bytes: int
    kept_weights_bytes: int
    weights_bytes: int
    lora_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activation_bytes_checkpointed: int
    activation_bytes_full: int
    overhead_bytes: int
    total_bytes: int
    device_memory_bytes: int | None
    gpus: int
    fits: bool | None
    advice: list[str] = field(default_factory=list)
    pageable_bytes: int = 0
    resident_bytes: int = 0
    allocated_bytes: int = 0
    sharded: bool = False
    lora_parameters: int = 0
    compute_dtype: str = "bfloat16"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _plan(shapes: ModelShapes, recipe: Recipe, device_memory: int | None, gpus: int, sharded: bool) -> MemoryPlan:
    """The plan without advice."""
    quant, training = recipe.quantization, recipe.training
    c = compute_dtype_bytes(quant.compute_dtype)
    quantized = sum(
        quantized_linear_bytes(fan_in, fan_out, quant.bits, quant.double_quant, c)
        for fan_in, fan_out in shapes.linears().values()
    ) * shapes.layers
    # prepare_model_for_kbit_training (train/model.py's load_model) upcasts every parameter that is not quantized to
    # float32 for stable training, so with a quantized base the kept layers cost 4 bytes, not 2. A 16-bit base
    # skips that step and stays in the compute dtype.
    kept_bytes = 4 if quant.bits in (4, 8) else c
    kept = kept_parameter_count(shapes) * kept_bytes

    targets = lora_targets(shapes, recipe.lora.target_modules)
    # DoRA's magnitudes and the modules trained in full train like the adapter: float32, a gradient, optimizer states
    sizes = _lora_tensor_sizes(shapes, targets, recipe.lora.r) + variant_tensor_sizes(shapes, targets, recipe.lora)
    lora_params = sum(elements * count for elements, count in sizes)
    lora = 4 * lora_params  # peft keeps adapters in float32 (autocast_adapter_dtype)
    gradients = 4 * lora_params
    optimizer = optimizer_state_bytes(sizes, training.optimizer)

    activations = activation_estimate(shapes, recipe, compute_bytes=c, sharded=sharded)
    checkpointed, full = activations.checkpointed(), activations.full()
    activation = checkpointed if training.gradient_checkpointing else full

    shards = max(gpus, 1) if sharded else 1
    if shards > 1:
        # FSDP keeps 1/N of every parameter and of its optimizer state on each device, and all-gathers one
        # decoder block at a time for its forward and backward, prefetching the next: two blocks in full. The
        # embeddings, final norm and head belong to the root unit, which FSDP does not reshard between forward
        # and backward, so at the peak they are there in full beside their shard.
        block = quantized / shapes.layers
        quantized = math.ceil(quantized / shards) + math.ceil(2 * block)
        kept = math.ceil(kept / shards) + kept
        lora, gradients, optimizer = (math.ceil(x / shards) for x in (lora, gradients, optimizer))
    weights = quantized + kept

    paged = training.optimizer.startswith("paged_")
    pageable = optimizer if paged else 0
    dynamic = lora + gradients + activation + (0 if paged else optimizer)
    overhead = CUDA_CONTEXT_BYTES + round(FRAGMENTATION * dynamic)
    total = weights + lora + gradients + optimizer + activation + overhead
    resident = total - pageable
    return MemoryPlan(
        quantized_weights_bytes=quantized,
        kept_weights_bytes=kept,
        weights_bytes=weights,
        lora_bytes=lora,
        gradient_bytes=gradients,
        optimizer_bytes=optimizer,
        activation_bytes=activation,
        activation_bytes_checkpointed=checkpointed,
        activation_bytes_full=full,
        overhead_bytes=overhead,
        total_bytes=total,
        device_memory_bytes=device_memory,
        gpus=gpus,
        fits=None if device_memory is None else resident <= device_memory,
        pageable_bytes=pageable,
        resident_bytes=resident,
        allocated_bytes=resident - overhead,
        sharded=sharded,
        lora_parameters=lora_params,
        compute_dtype="bfloat16" if quant.compute_dtype == "auto" else quant.compute_dtype,
    )


def checkpointing_needed(config: Mapping, recipe: Recipe, memory_bytes: int | None, *, gpus: int = 1,
                         sharded: bool = False) -> bool:
    """What `gradient_checkpointing: auto` means for this run: on unless the plan without it fits in
    `memory_bytes` (on when the memory is unknown, the safe choice)."""
    if memory_bytes is None:
        return True
    without = _plan(model_shapes(config), with_change(recipe, "training", "gradient_checkpointing", False),
                    memory_bytes, gpus, sharded)
    return not without.fits


def plan_memory(config: Mapping, recipe: Recipe, *, gpu_memory_bytes: int | None = None, gpus: int = 1,
                sharded: bool = False) -> MemoryPlan:
    """The per-device memory plan for training `recipe` on the model of `config` (a config.json dict).

    `gpus` with `sharded` plans FSDP across that many devices; without `sharded` every device holds a full
    replica (data parallel). With `gpu_memory_bytes`, `fits` says whether it fits and `advice` what to change.

    Raises:
        UserError: the config lacks the needed shapes, or no LoRA target is a linear layer of the model.
    """
    if gpus < 1:
        raise UserError("the number of GPUs must be 1 or more")
    shapes = model_shapes(config)
    if recipe.training.gradient_checkpointing == "auto":
        on = checkpointing_needed(config, recipe, gpu_memory_bytes, gpus=gpus, sharded=sharded)
        recipe = with_change(recipe, "training", "gradient_checkpointing", on)
    plan = _plan(shapes, recipe, gpu_memory_bytes, gpus, sharded)
    if gpu_memory_bytes is not None and (not plan.fits or plan.total_bytes > gpu_memory_bytes):
        def replan(changed: Recipe, devices: int, shard: bool) -> MemoryPlan:
            return _plan(shapes, changed, gpu_memory_bytes, devices, shard)

        plan.advice = advice(recipe, plan, gpu_memory_bytes, gpus, sharded, replan)
    return plan

