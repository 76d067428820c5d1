"""Causal LMs that hold one decoder layer at a time.

A model is built on the meta device from its config, which takes no memory, and its weights are read from
safetensors files only while they compute: first the modules outside the decoder layers (embeddings, final
norm, output head), then each decoder layer in turn, each freed after use. What computes is the model's own
code. Its forward runs once per prompt to record what every decoder layer is called with (attention mask,
rotary embeddings, cache); each layer then runs on every prompt while it is in memory; a last forward, in which
the layers hand back the hidden states already computed, applies the model's own final norm and head. So the
memory needed is the larger of one decoder layer and the modules outside the layers, plus the prompts'
activations and logits, whatever the model's size.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from ..core import compat
from ..core.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
READ_BLOCK_BYTES = 64 * 2**20  # of a stored tensor, resident while it is copied out


class CheckpointFiles:
    """The tensors of a safetensors checkpoint folder (one file, or shards and their index), read by name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise UserError(f"{index}: not a readable safetensors index: {exc}") from None
            self.file_of = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(str(self.folder / SINGLE_FILE), framework="pt") as handle:
                self.file_of = {name: self.folder / SINGLE_FILE for name in handle.keys()}
        else:
            raise UserError(f"{self.folder} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """The named tensor, in `dtype` (default: as stored) on `device`, in memory of its own.

        safetensors maps the whole file and hands out views into the mapping, whose pages stay in this process's
        resident memory while the file is open. So the tensor is copied (and converted) a block of rows at a
        time, each from a fresh opening of the file: besides the result, at most READ_BLOCK_BYTES are resident.
        """
        file = str(self.file_of[name])
        with safe_open(file, framework="pt") as handle:
            shape = handle.get_slice(name).get_shape()
            if len(shape) == 0 or shape[0] <= 1:
                return handle.get_tensor(name).to(device=device, dtype=dtype)
            first = handle.get_slice(name)[0:1]
        rows = max(1, READ_BLOCK_BYTES // max(1, first.nbytes))
        result = torch.empty(shape, dtype=dtype or first.dtype, device=device)
        for start in range(0, shape[0], rows):
            stop = min(start + rows, shape[0])
            with safe_open(file, framework="pt") as handle:
                result[start:stop] = handle.get_slice(name)[start:stop]
        return result


@dataclass
class Slot:
    """One weight of a model built on the meta device: the name it is read by, the meta parameter the model was
    built with, and every (module, attribute) holding it (tied weights have several), with the name the model
    gives it there."""

    name: str
    placeholder: torch.nn.Parameter
    owners: list[tuple[torch.nn.Module, str]] = field(default_factory=list)
    owner_names: list[str] = field(default_factory=list)  # one per owner, in the same order


# Reads a weight from the files (in the dtype and on the device it needs) and makes the model's parameter of it.
MakeParameter = Callable[[Slot, CheckpointFiles], torch.nn.Parameter]


class StreamedWeights:
    """The weights of a model on the meta device, brought in from a checkpoint and given back by module.

    Build it before a wrapper (peft) moves the modules around: the names are the model's own, which are the
    checkpoint's for every architecture whose weights transformers loads without renaming them.
    """

    def __init__(self, model: torch.nn.Module, files: CheckpointFiles, make_parameter: MakeParameter):
        self.files = files
        self.make_parameter = make_parameter
        slots: dict[int, Slot] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for attribute, parameter in module.named_parameters(recurse=False):
                if parameter.device.type != "meta":
                    continue
                slot = slots.setdefault(id(parameter), Slot("", parameter))
                slot.owners.append((module, attribute))
                slot.owner_names.append(f"{module_name}.{attribute}" if module_name else attribute)
        unknown = []
        for slot in slots.values():
            slot.name = next((name for name in slot.owner_names if name in files), "")
            if not slot.name:
                unknown.append(slot.owner_names[0])
        if unknown:
            raise UserError(
                f"{files.folder}: the checkpoint has no tensor {unknown[0]}"
                + (f" (nor {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + "; its tensors are named differently from the model's (an older layout that transformers renames "
                "while loading), which a layer-by-layer merge cannot follow"
            )
        self.slots = list(slots.values())
        self.by_name = {name: slot for slot in self.slots for name in slot.owner_names}  # every name of a tied weight

    def within(self, module: torch.nn.Module) -> list[Slot]:
        """The weights held by `module` or its submodules."""
        inside = {id(m) for m in module.modules()}
        return [slot for slot in self.slots if any(id(owner) in inside for owner, _ in slot.owners)]

    def outside(self, modules: Iterable[torch.nn.Module]) -> list[Slot]:
        """The weights held by none of `modules` (nor their submodules)."""
        inside = {id(slot) for module in modules for slot in self.within(module)}
        return [slot for slot in self.slots if id(slot) not in inside]

    @contextmanager
    def held(self, slots: list[Slot]) -> Iterator[None]:
        """The weights of `slots` in memory within the block, given back to the meta device after it."""
        try:
            for slot in slots:
                parameter = self.make_parameter(slot, self.files)
                for module, attribute in slot.owners:
                    setattr(module, attribute, parameter)
            yield
        finally:
            for slot in slots:
                for module, attribute in slot.owners:
                    setattr(module, attribute, slot.placeholder)
                    compat.forget_quantization_state(module)


def move_buffers(model: torch.nn.Module, device) -> None:
    """Put the buffers a meta-device model computed when it was built (rotary frequencies) on `device`."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.device.type != "meta":
                setattr(module, name, buffer.to(device))  # assigning to a buffer's name replaces the buffer


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers: its first ModuleList with one entry per hidden layer of the config."""
    config = model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(getattr(config, "text_config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"cannot find the {count} decoder layers of {type(model).__name__}, so it cannot be read a layer at a time")


# ---------------------------------------------------------------------------------------------
# The forward, a layer at a time

class _Recorded(Exception):
    """Raised by the last decoder layer's recorder: nothing after the layers needs to run yet."""


@dataclass
class LayerCall:
    """What the model called one decoder layer with, for one prompt, apart from the hidden states."""

    args: tuple
    kwargs: dict
    hidden_as_keyword: bool

    def __call__(self, layer: torch.nn.Module, hidden: torch.Tensor):
        if self.hidden_as_keyword:
            return layer(*self.args, hidden_states=hidden, **self.kwargs)
        return layer(hidden, *self.args, **self.kwargs)


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _recorder(calls: list[list[LayerCall]], first_hidden: list, prompt: int, count: int) -> Callable[[int], Callable]:
    def make(index: int):
        def forward(*args, **kwargs):
            hidden = _hidden_of(args, kwargs)
            kwargs = {key: value for key, value in kwargs.items() if key != "hidden_states"}
            calls[index][prompt] = LayerCall(args[1:], kwargs, hidden_as_keyword=not args)
            if index == 0:
                first_hidden[prompt] = hidden
            if index == count - 1:
                raise _Recorded
            return hidden  # what the next layer gets here does not matter: only its other arguments are kept
        return forward
    return make


def _replayer(final: torch.Tensor, count: int, as_tuple: bool) -> Callable[[int], Callable]:
    def make(index: int):
        def forward(*args, **kwargs):
            hidden = final if index == count - 1 else _hidden_of(args, kwargs)
            return (hidden,) if as_tuple else hidden
        return forward
    return make


@dataclass
class LayerHooks:
    """What else to do while a streamed forward holds the model's layers.

    Attributes:
        before_layers: called once the modules outside the layers are given back, before the first layer is read.
        while_held: called with (index, layer) after each layer ran on every prompt, while it is still in memory.
        after_layers: called once the last layer is given back, before the modules outside the layers are read again.
        on_layer: called with (layers done, layers) after each layer.
    """

    before_layers: Callable[[], None] = lambda: None
    while_held: Callable[[int, torch.nn.Module], None] = lambda index, layer: None
    after_layers: Callable[[], None] = lambda: None
    on_layer: Callable[[int, int], None] = lambda done, total: None


def streamed_logits(model: torch.nn.Module, weights: StreamedWeights, prompts: list[list[int]], device,
                    hooks: LayerHooks | None = None) -> list[torch.Tensor]:
    """The float32 logits (on the CPU, one [tokens, vocab] tensor per prompt) of `model(input_ids=prompt)`,
    computed with one decoder layer in memory at a time.

    Args:
        model: the model whose forward is called (a PeftModel or a causal LM), built on the meta device.
        weights: its weights, as `StreamedWeights` of the model it wraps.
    """
    hooks = hooks or LayerHooks()
    layers = decoder_layers(model)
    count = len(layers)
    outer = weights.outside(layers)
    inputs = [torch.tensor([ids], device=device) for ids in prompts]
    calls: list[list] = [[None] * len(prompts) for _ in range(count)]
    hidden: list = [None] * len(prompts)
    logits = []
    with torch.no_grad():
        with weights.held(outer):
            for prompt, input_ids in enumerate(inputs):
                with compat.forwards_replaced(layers, _recorder(calls, hidden, prompt, count)):
                    try:
                        model(input_ids=input_ids)
                    except _Recorded:
                        pass
        hooks.before_layers()
        as_tuple = False
        for index, layer in enumerate(layers):
            with weights.held(weights.within(layer)):
                for prompt in range(len(prompts)):
                    output = calls[index][prompt](layer, hidden[prompt])
                    as_tuple = not isinstance(output, torch.Tensor)
                    hidden[prompt] = output[0] if as_tuple else output
                    calls[index][prompt] = None
                hooks.while_held(index, layer)
            hooks.on_layer(index + 1, count)
        hooks.after_layers()
        with weights.held(outer):
            for prompt, input_ids in enumerate(inputs):
                with compat.forwards_replaced(layers, _replayer(hidden[prompt], count, as_tuple)):
                    logits.append(model(input_ids=input_ids).logits.float().cpu()[0])
                hidden[prompt] = None
    return logits
