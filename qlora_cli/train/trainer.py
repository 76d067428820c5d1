"""The transformers Trainer as qlora runs it: its arguments from the recipe, and a subclass that asks the
training method (train/methods) for the loss, counts the tokens it trains on and stops before a non-finite loss
is applied."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from ..core import compat
from ..core.context import RunContext
from ..core.recipe import TrainingSection
from ..data.prepare import EpochSeededLengthGroupedSampler
from ..data.store import lengths_of
from ..data.tokenize import FedTokens
from .callbacks import NonFiniteGuard
from .checkpoint import staging_dir
from .profile import PhaseClock
from .trackers import TrackerLog

if TYPE_CHECKING:
    from .run import Run


def scheduler_name(training: TrainingSection) -> str:
    # transformers' "constant" ignores warmup; the paper's schedule is constant after a warmup.
    if training.lr_scheduler == "constant" and training.warmup > 0:
        return "constant_with_warmup"
    return training.lr_scheduler


FSDP_ARGUMENTS = {
    # FSDP2 over the decoder layers, gathering a full state dict to save the adapter.
    "fsdp": True,
    "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                    "reshard_after_forward": True, "cpu_ram_efficient_loading": False},
}


def training_arguments(training: TrainingSection, run_dir: Path, context: RunContext, has_eval: bool):
    return TrainingArguments(
        # The Trainer writes checkpoints here; checkpoint.finalize seals and moves them.
        output_dir=str(staging_dir(run_dir)),
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_steps=training.max_steps if training.max_steps is not None else -1,
        num_train_epochs=training.epochs,
        learning_rate=training.learning_rate,
        lr_scheduler_type=scheduler_name(training),
        warmup_steps=training.warmup if training.warmup < 1 else int(training.warmup),
        max_grad_norm=training.max_grad_norm,
        weight_decay=training.weight_decay,
        adam_beta2=training.adam_beta2,
        optim=training.optimizer,
        bf16=context.compute_dtype == torch.bfloat16,
        fp16=context.compute_dtype == torch.float16,
        use_cpu=context.device == "cpu",
        logging_steps=training.logging_steps,
        logging_first_step=True,
        # Its check of every micro-batch's loss makes the host wait for the GPU each time; NonFiniteGuard
        # stops the run on a non-finite loss instead, checking once per update.
        logging_nan_inf_filter=False,
        save_strategy="no",  # saving is driven by the Checkpointer callback (schedule, signals)
        seed=training.seed,
        data_seed=training.seed,
        # Length grouping is our own sampler (data.prepare.EpochSeededLengthGroupedSampler), installed on the
        # trainer by compat.install_train_sampler in make_trainer.
        train_sampling_strategy="random",
        per_device_eval_batch_size=training.batch_size,
        eval_strategy="steps" if has_eval and training.eval_steps else "no",
        eval_steps=training.eval_steps,
        prediction_loss_only=True,
        report_to=list(training.report_to) or "none",  # train/trackers.py configures them
        run_name=run_dir.name,
        disable_tqdm=True,
        # Data-parallel runs (under torchrun): gloo on CPU; LoRA leaves no parameter unused.
        ddp_backend="gloo" if context.device == "cpu" and context.distributed else None,
        ddp_find_unused_parameters=False,
        **(copy.deepcopy(FSDP_ARGUMENTS) if context.sharded else {}),  # TrainingArguments edits fsdp_config in place
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


class MethodMetrics:
    """The training method's metrics of the micro-batches since the last log, summed where they are computed
    (on the device: reading them back at every micro-batch would make the host wait for the GPU) and averaged
    over the micro-batches, and over the processes of a data-parallel run, when the loss is logged."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for name, value in metrics.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def averages(self, accelerator) -> dict[str, float]:
        """The averages, every process's included; empties the record."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        means = torch.stack([self.sums[name].to(accelerator.device) / self.counts[name] for name in names])
        means = accelerator.reduce(means, reduction="mean") if accelerator.num_processes > 1 else means
        self.sums, self.counts = {}, {}
        return dict(zip(names, means.tolist()))


class RecipeTrainer(Trainer):
    """The transformers Trainer with the training method's loss (`method.compute_loss`) and metrics (logged
    with the loss), counting into `fed` the tokens of every batch it trains on and stopping before a
    non-finite loss is applied. `phases` times the steps that `qlora train --profile` profiles (and nothing
    otherwise)."""

    def __init__(self, *args, method, fed: FedTokens, phases: PhaseClock, guard: NonFiniteGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.fed = fed
        self.phases = phases
        self.guard = guard
        self.method_metrics = MethodMetrics()
        self.eval_method_metrics = MethodMetrics()  # the same metrics over an evaluation, logged with eval_ names
        # Where a step begins: the Trainer fetches an optimizer step's micro-batches before they train.
        compat.time_batch_fetching(self, phases.begin_step, lambda: phases("data"))

    def record_metrics(self, metrics: dict) -> None:
        """The method's metrics of one micro-batch, logged as their average with the next loss (or, during an
        evaluation, with the evaluation loss, named eval_...)."""
        (self.method_metrics if self.model.training else self.eval_method_metrics).add(metrics)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.phases("forward"):
            loss, outputs = self.method.compute_loss(self, model, inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.phases("training_step"):
            self.fed.count(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.guard.observe(loss)
            return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the method's metrics join the loss
            logs.update(self.method_metrics.averages(self.accelerator))
        if "eval_loss" in logs:
            logs.update({f"eval_{name}": value for name, value in self.eval_method_metrics.averages(self.accelerator).items()})
        super().log(logs, start_time)


def unpaged_on_cpu(args, model, context: RunContext):
    """The optimizer a paged one is on a CPU: paging moves optimizer states between GPU and CPU memory, and on
    a CPU they are in RAM already. The same bitsandbytes optimizer, created unpaged, trains identically and
    spares the user bitsandbytes' warning about it at every run. None where nothing changes."""
    if context.device != "cpu" or "paged" not in getattr(args.optim, "value", args.optim):
        return None
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_class, {**kwargs, "is_paged": False}


def make_trainer(run: "Run", fed: FedTokens, callbacks: list, phases: PhaseClock) -> RecipeTrainer:
    recipe, method = run.recipe, run.method
    guard = NonFiniteGuard()
    args = training_arguments(recipe.training, run.run_dir, run.context, has_eval=bool(run.prepared.eval))
    method.prepare(run.model)
    trainer = RecipeTrainer(
        model=run.model,
        args=args,
        optimizer_cls_and_kwargs=unpaged_on_cpu(args, run.model, run.context),
        train_dataset=run.prepared.train,
        eval_dataset=run.prepared.eval or None,
        data_collator=method.collator(run.tokenizer, recipe.data),
        callbacks=[guard, *callbacks],
        method=method,
        fed=fed,
        phases=phases,
        guard=guard,
    )
    trainer.remove_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrackerLog):  # it writes the recipe through the integrations' own runs
            callback.integrations = trainer.callback_handler.callbacks
    if recipe.data.group_by_length and not recipe.data.packing:
        window = trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps
        compat.install_train_sampler(trainer, lambda dataset: EpochSeededLengthGroupedSampler(
            lengths_of(method, dataset), window, trainer.args.seed))
    return trainer
