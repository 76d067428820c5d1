"""What `qlora serve` serves: one model, or several runs of one base loaded once with an adapter each.

Runs trained on the same base (the same checkpoint, quantized the same way) share its weights: the base is
loaded once and each run's adapter is added to it under its own peft adapter name. A request picks a run by
its id (the run's folder name), and one batch may mix runs: peft applies each row's adapter to that row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.errors import Problem, UserError
from ..core.rundir import ADAPTER, adapter_base_model, is_run_dir, read_run_recipe


@dataclass(frozen=True)
class ServedModel:
    """A model id clients can ask for: the tokenizer (and chat template) it was trained with, the tokens that
    end its replies, and the peft adapter that makes it (None: the model as loaded)."""

    name: Optional[str]
    tokenizer: object
    stop_ids: frozenset[int]
    description: str
    adapter: Optional[str] = None


def served_name(reference: str) -> str:
    """The model id to serve under: a run's or a model directory's folder name, a .gguf file's stem, or
    the reference itself (a hub id, the bundled alias)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path.resolve().name
    if path.suffix == ".gguf":
        return path.stem
    return reference


def base_key(run_dir: Path) -> dict:
    """What two runs must share to be served on one loaded base: the checkpoint and how it is loaded."""
    recipe = read_run_recipe(run_dir)
    return {"base model": adapter_base_model(run_dir), "model.revision": recipe.model.revision,
            "model.trust_remote_code": recipe.model.trust_remote_code,
            **{f"quantization.{key}": value for key, value in recipe.quantization.model_dump().items()}}


def check_servable_together(references: list[str]) -> list[Path]:
    """The run folders of `references`, checked to be servable on one base (before any model loads).

    Raises:
        UserError: one is not a finished run, two have the same name, or one was trained on another base
            or quantized differently (naming the setting and both values).
    """
    runs, problems = [], []
    for reference in references:
        path = Path(reference).expanduser()
        if not (path.is_dir() and is_run_dir(path)):
            problems.append(Problem(f"serving several models needs runs (a base + adapter each) on one base; "
                                    f"{reference} is not a finished run folder", file=path))
        runs.append(path)
    if problems:
        raise UserError(problems)
    names: dict[str, Path] = {}
    for path in runs:
        name = served_name(str(path))
        if name in names:
            raise UserError(f"two runs would both be served as `{name}` ({names[name]} and {path}): rename one folder")
        names[name] = path
    first = base_key(runs[0])
    for path in runs[1:]:
        key = base_key(path)
        differences = [f"{setting}: {key[setting]!r} here, {first[setting]!r} in {runs[0]}"
                       for setting in first if key.get(setting) != first[setting]]
        if differences:
            raise UserError(Problem("cannot be served with the others: one server loads one base model, and this run "
                                    f"was trained on another base or quantized differently ({'; '.join(differences)}); "
                                    "serve it on its own", file=path))
    return runs


def load_runs(runs: list[Path]):
    """The shared base with every run's adapter, and the served model of each run (its adapter named `run<i>`).

    Raises:
        UserError: a tokenizer, the base or an adapter cannot be loaded.
    """
    from peft import PeftModel

    from ..core import compat
    from ..core.context import inference_context
    from ..core.models import LoadedModel, load_quantized_base
    from .generate import end_token_ids

    tokenizers = []
    for run in runs:  # before the base model loads: a damaged adapter folder should not cost that wait
        try:
            tokenizers.append(_tokenizer(run / ADAPTER))
        except (OSError, ValueError) as exc:
            raise UserError(Problem(f"cannot load the tokenizer saved with the adapter: {exc}", file=run / ADAPTER)) from None
    recipe = read_run_recipe(runs[0])
    model = load_quantized_base(adapter_base_model(runs[0]), recipe.model, recipe.quantization,
                                inference_context(recipe.quantization.compute_dtype))
    served = []
    for index, (run, tokenizer) in enumerate(zip(runs, tokenizers)):
        adapter = f"run{index}"  # peft adapter names become module keys: a folder name may not fit
        try:
            with compat.peft_reading_deprecated_flags():
                if index == 0:
                    model = PeftModel.from_pretrained(model, run / ADAPTER, adapter_name=adapter)
                else:
                    model.load_adapter(run / ADAPTER, adapter_name=adapter)
        except Exception as exc:  # peft raises several types for a damaged adapter
            raise UserError(Problem(f"cannot load the adapter: {exc}", file=run / ADAPTER)) from None
        stops = frozenset(end_token_ids(tokenizer, getattr(model, "generation_config", None)))
        served.append(ServedModel(served_name(str(run)), tokenizer, stops, f"{run} (4-bit base + adapter)", adapter))
    description = f"{len(runs)} runs on one 4-bit base ({adapter_base_model(runs[0])})"
    return LoadedModel(model.eval(), tokenizers[0], description), served


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
