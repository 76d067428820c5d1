"""The training loss: next-token cross-entropy computed only where labels are trained, in chunks.

The standard causal-LM loss projects every position onto the whole vocabulary, keeps those logits
(and their float32 copy, and a gradient of the same size) alive until backward, and then masks most
of them away: prompts, padding and packing seams. Here the model stops at its last hidden state, the
positions with a trained label are picked out, and the output projection, the log-softmax and its
gradient run a few hundred rows at a time. The gradient with respect to the hidden states is
computed in the forward pass (the loss is a scalar, so its backward only scales it), so no logits
outlive their chunk. The value is the same loss: the sum over trained tokens divided by the number
of trained tokens in the batch (or by `num_items_in_batch`, the Trainer's count over a whole
gradient-accumulation step).
"""

from __future__ import annotations

import weakref

import torch
from accelerate.utils import extract_model_from_parallel

from ..core import compat
from ..data.tokenize import IGNORE_INDEX
from . import loss_spec
from .loss_spec import logits_are_plain


def trained_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): which positions predict a trained label, and those labels.

    Position t predicts label t+1, as in transformers' causal-LM loss; the last position predicts nothing.
    Selecting by a boolean mask (here, and in the model's `logits_to_keep`) makes the host wait for a GPU
    once per micro-batch, as the result's size must be known; the divisor, the non-finite check and the
    token count add no further waits.
    """
    shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


_cast_cache: dict = {}


def forget_cast_weights() -> None:
    """Free the cached cast of a frozen head (about 1 GB for an 8B model's vocabulary in 16 bits): the cache holds
    the cast copy itself, not weakly, so it outlives the model until cleared."""
    _cast_cache.clear()


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, cast once while a frozen weight stays unchanged (a 49k x 576 head costs
    ~85 ms to cast on a 2-core CPU, every step otherwise). The cache holds the weight by weak reference,
    so another model's weight at a reused address is never mistaken for it."""
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    source = _cast_cache.get("source")
    if source is None or source() is not weight or _cast_cache["key"] != (compat.tensor_version(weight), dtype):
        _cast_cache.update(source=weakref.ref(weight), key=(compat.tensor_version(weight), dtype), value=weight.detach().to(dtype))
    return _cast_cache["value"]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) / divisor, with gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, matmul_dtype, chunk_rows):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        head = cast_weight(weight, matmul_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows].to(matmul_dtype)
            chunk_targets = targets[start : start + chunk_rows]
            logits = (rows @ head.T).float()
            log_normalizer = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            total += (log_normalizer - target_logits).sum()
            if not (want_hidden_grad or want_weight_grad):
                continue
            # d(loss)/d(logits) = (softmax - one_hot(target)) / divisor, built in place over the logits.
            gradient = logits.sub_(log_normalizer[:, None]).exp_()
            gradient[torch.arange(len(chunk_targets), device=gradient.device), chunk_targets] -= 1
            gradient = gradient.div_(divisor).to(matmul_dtype)
            if want_hidden_grad:
                grad_hidden[start : start + chunk_rows] = gradient @ head
            if want_weight_grad:
                grad_weight += (gradient.T @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None,
            None, None, None, None,
        )


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         divisor: float | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, summed and divided by `divisor`
    (default: the number of targets), never holding more than one chunk of logits.

    Matmuls run in the autocast dtype when autocast is on, as the model's own output projection would.
    """
    if divisor is None:
        divisor = max(len(targets), 1)
    # A tensor divisor (the Trainer's token count) stays on the device: reading it back would make the host
    # wait for the GPU at every micro-batch.
    divisor = divisor.to(device=hidden.device, dtype=torch.float32) if isinstance(divisor, torch.Tensor) else float(divisor)
    device_type = hidden.device.type
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    chunk_rows = loss_spec.chunk_rows(weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, divisor, matmul_dtype, chunk_rows)


def output_head(model):
    """The plain `nn.Linear` output projection of a causal LM (PEFT-wrapped or not), or None when its
    logits are more than that projection (soft-capping, scaling, a bias) or its forward cannot keep only
    some positions, and the model's own loss must run."""
    base = base_model_of(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if not logits_are_plain(lambda key: getattr(base.config, key, None)):
        return None
    if not compat.output_projection_is_sliceable(base):
        return None
    return head


def base_model_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_only_loss(model, head: torch.nn.Linear, inputs: dict, num_items_in_batch=None):
    """(loss, outputs) of a causal-LM forward whose loss is `linear_cross_entropy` on the trained positions.

    `model` is what is called (it may be wrapped for data parallelism, whose hooks must see the call).
    It runs with its output projection skipped and keeps only the trained positions, so the
    vocabulary is projected here, a chunk at a time; `outputs.logits` holds those positions' hidden states.
    """
    mask, targets = trained_targets(inputs["labels"])
    with compat.output_projection_skipped(base_model_of(extract_model_from_parallel(model)), head):
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"}, logits_to_keep=mask)
    compat.check_kept_hidden_states(outputs.logits, len(targets), head.in_features)
    return linear_cross_entropy(outputs.logits, head.weight, targets, num_items_in_batch), outputs
