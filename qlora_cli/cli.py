"""The command line: parses arguments and calls one stage function per command.

Stays thin and imports nothing heavy at module level: `qlora --help` and `qlora validate` never
import torch.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from .core.compat import show_flags_without_a_type
from .core.errors import EXIT_INTERRUPTED, EXIT_RUN_FAILED, EXIT_USER_ERROR, RunFailure, RunInterrupted, UserError
from .inference.sampling import DEFAULT_SAMPLING, Sampling

show_flags_without_a_type()

app = typer.Typer(
    name="qlora",
    help="Fine-tune large language models with QLoRA, driven by YAML recipes.",
    no_args_is_help=True,
    # --install-completion / --show-completion: Typer's shell completion (bash, zsh, fish, PowerShell)
    add_completion=True,
    pretty_exceptions_enable=False,
)


def show_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"qlora {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=show_version, is_eager=True, help="Print qlora's version and exit.")] = None,
) -> None:
    """Fine-tune large language models with QLoRA, driven by YAML recipes."""

data_app = typer.Typer(help="Look at the training data as the model will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")

eval_app = typer.Typer(help="Chatbot benchmarks (answers, a judge, relative scores, Elo and Bradley-Terry), MMLU-style accuracy, lm-evaluation-harness.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
EVAL_COMMANDS = ("run", "score", "mmlu", "harness", "--help", "-h")
PROFILE_STEPS = 5  # `qlora train --profile` with no number

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key: --set training.learning_rate=1e-4 (repeatable)."),
]
ModelArg = Annotated[str, typer.Argument(
    help="A run directory, a merged or local model directory, a hub id, a .gguf, or smollm2-135m-instruct.",
    show_default=False)]
# Sampling options shared by generate, chat and eval (the defaults, the paper's, are inference/sampling.py's).
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Most tokens per answer.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")]
Seed = Annotated[int, typer.Option(help="Sampling seed.")]
OutputDirOption = Annotated[Optional[Path], typer.Option("--output-dir", metavar="DIR", help="Run directory (overrides output.dir).")]


@app.command()
def validate(recipe: RecipeArg, set_: SetOption = None, output_dir: OutputDirOption = None) -> None:
    """Check a recipe and print it resolved, without loading anything."""
    from .core.console import make_console, recipe_table
    from .core.recipe import load_recipe

    resolved = load_recipe(recipe, set_ or [], output_dir)
    console = make_console()
    console.print(recipe_table(resolved, title=f"{recipe} (resolved)"))
    console.print("[green]The recipe is valid.")


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOption = None,
    output_dir: OutputDirOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint of the run directory.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, metavar="N", help="Train data-parallel in this many processes (torchrun on this machine).")] = 1,
    profile: Annotated[Optional[int], typer.Option(
        "--profile", min=1, metavar="[N]",
        help=f"Profile N optimizer steps (default {PROFILE_STEPS}) after the first warm-up steps, into RUN_DIR/profile: "
             "a trace, the top operations and where a step's time goes. Training goes on as usual.")] = None,
) -> None:
    """Fine-tune a model as the recipe says and write the run directory."""
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        from .core.distributed import launch
        from .core.recipe import load_recipe as check
        from .data.sources import load_datasets
        from .train.methods import load_method

        # Bad input is reported once, with exit code 2, before any process starts (each checks again).
        checked = check(recipe, set_ or [], output_dir)
        load_datasets(checked.data, checked.training.seed, load_method(checked.training.method).read_row)
        from .core.context import run_context

        run_context(checked.quantization.compute_dtype, checked.training.distributed, processes=nproc)

        argv = [a for a in sys.argv[1:]]
        index = next(i for i, a in enumerate(argv) if a.startswith("--nproc"))
        del argv[index: index + (1 if "=" in argv[index] else 2)]
        raise SystemExit(launch(nproc, argv))
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    from .core.console import make_console
    from .core.recipe import load_recipe

    resolved = load_recipe(recipe, set_ or [], output_dir)
    from .train.run import run_training

    command = " ".join(["qlora", "train", str(recipe), *[f"--set {item}" for item in set_ or []],
                        *([f"--output-dir {output_dir}"] if output_dir else []), "--resume"])
    run_training(resolved, overwrite=overwrite, resume=resume, console=make_console(), resume_command=command,
                 profile_steps=profile)


@app.command()
def plan(
    recipe: RecipeArg,
    gpu_memory: Annotated[Optional[str], typer.Option("--gpu-memory", help="Memory of each GPU, e.g. 24GiB or 80GB.")] = None,
    gpus: Annotated[int, typer.Option(min=1, help="How many GPUs.")] = 1,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard weights, LoRA and optimizer states across the GPUs (FSDP).")] = False,
    config: Annotated[Optional[Path], typer.Option(help="A model config.json (or its folder) instead of model.base's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    set_: SetOption = None,
) -> None:
    """Plan GPU memory for a recipe from the model's config alone, before anything loads."""
    import json as json_module

    from .plan.configs import read_model_config
    from .plan.memory import plan_memory
    from .plan.sizes import parse_bytes
    from .plan.report import plan_table
    from .core.recipe import load_recipe

    resolved = load_recipe(recipe, set_ or [])
    source = config if config is not None else model_config_source(resolved.model.base)
    result = plan_memory(
        read_model_config(source), resolved,
        gpu_memory_bytes=parse_bytes(gpu_memory) if gpu_memory else None, gpus=gpus, sharded=fsdp,
    )
    if as_json:
        print(json_module.dumps(result.to_json(), indent=2))
        return
    from .core.console import make_console

    make_console().print(plan_table(result, title=f"Memory plan for {recipe} (per GPU)"))


def model_config_source(base: str):
    """Where the planner reads the model's config: a local directory or hub id as is; the config shipped for the
    bundled model; the converted checkpoint of another .gguf file (converting once if needed)."""
    from .core.recipe import BUNDLED_MODEL_ALIAS

    if base == BUNDLED_MODEL_ALIAS:
        from .plan.configs import shipped_config

        return shipped_config(BUNDLED_MODEL_ALIAS)
    if base.endswith(".gguf"):
        from .core.models import resolve_model_path

        return resolve_model_path(base)
    return base


@data_app.command("preview")
def data_preview(
    recipe: RecipeArg,
    count: Annotated[int, typer.Option("-n", "--count", min=0, help="How many examples to show.")] = 3,
    set_: SetOption = None,
) -> None:
    """Show tokenized examples with the trained tokens marked, and statistics of the data."""
    from .core.console import make_console, working
    from .core.recipe import load_recipe
    from .data.sources import load_datasets
    from .train.methods import load_method

    resolved = load_recipe(recipe, set_ or [])
    method = load_method(resolved.training.method)
    console = make_console()
    with working(console, "Reading and checking the data"):
        datasets = load_datasets(resolved.data, resolved.training.seed, method.read_row)
    from .core.models import load_tokenizer, quiet_libraries, resolve_model_path
    from .data.prepare import prepare
    from .data.preview import show_preview
    from .data.templates import resolve_template

    quiet_libraries(console.is_terminal)
    tokenizer = load_tokenizer(resolve_model_path(resolved.model.base, console), resolved.model)
    template = resolve_template(resolved.data.template, tokenizer)
    prepared = prepare(resolved, tokenizer, template, datasets, method, console=console)
    show_preview(console, resolved, method, tokenizer, datasets, prepared, count)


def load_generation_model(console, model: str):
    """The model for generation (`inference.generate.load_for_generation`), loaded under a "Loading" line, with the
    libraries' progress bars off a terminal."""
    from .core.console import working
    from .core.models import quiet_libraries
    from .inference.generate import load_for_generation

    quiet_libraries(console.is_terminal)
    with working(console, f"Loading {model}"):
        return load_for_generation(model)


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option("--file", help="Prompts, one per line (.txt) or JSONL rows with a `prompt` field.")] = None,
    system: Annotated[Optional[str], typer.Option(help="A system message for every prompt.")] = None,
    max_new_tokens: MaxNewTokens = DEFAULT_SAMPLING.max_new_tokens,
    temperature: Temperature = DEFAULT_SAMPLING.temperature,
    top_p: TopP = DEFAULT_SAMPLING.top_p,
    seed: Seed = DEFAULT_SAMPLING.seed,
) -> None:
    """Answer prompts with a model, using the chat template it was trained with."""
    from .inference.prompts import read_prompts

    prompts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    if not prompts:
        raise UserError("give at least one --prompt or a --file of prompts")
    from rich.console import Console

    from .core.console import working
    from .inference.generate import generate as run_generate

    console = Console(highlight=False)
    loaded = load_generation_model(console, model)
    streamer = None
    if len(prompts) == 1 and console.is_terminal:
        from transformers import TextStreamer

        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answering = working(console, f"Answering {len(prompts)} prompt{'s' if len(prompts) != 1 else ''}") if streamer is None else nullcontext()
    with answering:
        answers = run_generate(
            loaded, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, system=system, streamer=streamer,
        )
    if streamer is None:
        for question, answer in zip(prompts, answers):
            console.print(f"[bold]> {question}[/bold]", markup=True)
            console.print(answer, markup=False)
            console.print()


@app.command()
def chat(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option(help="The system message to start with.")] = None,
    max_new_tokens: MaxNewTokens = DEFAULT_SAMPLING.max_new_tokens,
    temperature: Temperature = DEFAULT_SAMPLING.temperature,
    top_p: TopP = DEFAULT_SAMPLING.top_p,
    seed: Seed = DEFAULT_SAMPLING.seed,
) -> None:
    """Talk with a model: multi-turn, streamed, with /reset and /system."""
    from .inference.chat import chat_loop
    from .core.console import make_console

    loaded = load_generation_model(make_console(), model)
    chat_loop(loaded, input, sys.stdout, system=system, max_new_tokens=max_new_tokens,
              temperature=temperature, top_p=top_p, seed=seed)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `qlora train`.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: RUN_DIR/merged).")] = None,
    dtype: Annotated[str, typer.Option(help="Dtype of the merged weights: bfloat16, float16 or float32.")] = "bfloat16",
    base: Annotated[str, typer.Option(help="Merge into the `dequantized` 4-bit (or 8-bit) weights the adapter was trained against, or the `original` weights.")] = "dequantized",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    gguf: Annotated[Optional[list[str]], typer.Option("--gguf", help="Also write a GGUF file for llama.cpp/Ollama: f16 or q8_0 (repeatable; Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 text, Phi-3).")] = None,
    max_shard_size: Annotated[Optional[str], typer.Option(help="Largest safetensors file written, e.g. 2GB or 500MiB: the most of the output held in memory at once (default 1GB).", show_default=False)] = None,
) -> None:
    """Export a merged checkpoint that plain transformers loads, with a parity report; the model is merged and
    checked a layer at a time, and the memory and disk needed are said (and checked) before it starts."""
    from .export.gguf_types import check_gguf_types

    check_gguf_types(gguf or [])
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype: {dtype!r} is not one of bfloat16, float16, float32")
    if base not in ("dequantized", "original"):
        raise UserError(f"--base: {base!r} is not one of dequantized, original")
    from .core.console import key_value_table, make_console
    from .export.merge import merge_run
    from .core.models import quiet_libraries

    console = make_console()
    quiet_libraries(console.is_terminal)
    report = merge_run(run_dir, out=out, dtype_name=dtype, base=base, overwrite=overwrite,
                       gguf_types=tuple(gguf or []), max_shard_size=max_shard_size, console=console)
    rows = [(key, value) for key, value in report.items() if key != "gguf"]
    if "gguf" in report:
        from .export.gguf import gguf_summary

        rows += [(f"gguf {out_type}", gguf_summary(entry)) for out_type, entry in report["gguf"].items()]
    console.print(key_value_table("Merge", rows))


@app.command("gguf-adapter")
def gguf_adapter(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `qlora train`.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: RUN_DIR/gguf-adapter).")] = None,
    out_type: Annotated[str, typer.Option("--type", help="GGUF type of the base files: f16 or q8_0.")] = "f16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing adapter export.")] = False,
) -> None:
    """Write the adapter alone as a GGUF LoRA file for llama.cpp's --lora (and Ollama's ADAPTER), with the base GGUF
    files it applies to (dequantized from the 4-bit weights it was trained with, and the original), and the KL of
    each base + adapter against the trained model."""
    from .export.gguf_types import check_gguf_types

    check_gguf_types([out_type])
    from .core.console import key_value_table, make_console
    from .core.models import quiet_libraries
    from .export.gguf_adapter import export_adapter_gguf

    console = make_console()
    quiet_libraries(console.is_terminal)
    report = export_adapter_gguf(run_dir, out=out, out_type=out_type, overwrite=overwrite, console=console)
    rows = [(key, value) for key, value in report.items() if key != "bases"]
    rows += [(f"base {base}", f"{entry['file']}: with the adapter, mean KL {entry['mean_kl_nats_per_token']:.3g}, "
              f"max |Δlogit| {entry['max_abs_logit_diff']:.3g}") for base, entry in report["bases"].items()]
    console.print(key_value_table("GGUF adapter", rows))


@eval_app.command("run")
def eval_run(
    model: Annotated[str, typer.Argument(help="The model under test: a run directory, a merged/local model, a hub id.", show_default=False)],
    baseline: Annotated[Optional[list[str]], typer.Option(help="A model to compare with (repeatable); `base` is a run's base model. The first is the reference for relative scores.")] = None,
    questions: Annotated[Optional[Path], typer.Option(help="Questions (Vicuna, MT-bench, OpenAssistant, prompts); default: the 80 shipped ones.")] = None,
    answers: Annotated[Optional[list[Path]], typer.Option("--answers", help="Answers made elsewhere (JSONL or a JSON array, in this project's, FastChat's or Arena-Hard's form): another model to compare (repeatable).")] = None,
    judge: Annotated[str, typer.Option(help="An OpenAI-compatible base URL (http...), or a local model reference.")] = "smollm2-135m-instruct",
    judge_model: Annotated[Optional[str], typer.Option(help="The model name an HTTP judge serves.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the HTTP judge's API key.")] = "OPENAI_API_KEY",
    mode: Annotated[str, typer.Option(help="pairwise, relative, or both.")] = "both",
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: RUN_DIR/eval, else eval/<model>).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N questions.")] = None,
    answers_format: Annotated[Optional[list[str]], typer.Option("--answers-format", help="Also write every model's answers in this tool's layout for its own judge: fastchat or arena-hard (repeatable), under OUT/<format>/model_answer/.")] = None,
    answers_only: Annotated[bool, typer.Option("--answers-only", help="Stop after the answers (and --answers-format files); load no judge.")] = False,
    max_new_tokens: MaxNewTokens = DEFAULT_SAMPLING.max_new_tokens,
    temperature: Temperature = DEFAULT_SAMPLING.temperature,
    top_p: TopP = DEFAULT_SAMPLING.top_p,
    seed: Seed = DEFAULT_SAMPLING.seed,
) -> None:
    """Answer the questions with each model, judge every pair in both orders, and write the report."""
    modes = {"both": ["relative", "pairwise"], "pairwise": ["pairwise"], "relative": ["relative"]}.get(mode)
    if modes is None:
        raise UserError(f"--mode: {mode!r} is not one of pairwise, relative, both")
    from .evaluation.answers import ANSWER_FORMATS

    for layout in answers_format or []:
        if layout not in ANSWER_FORMATS:
            raise UserError(f"--answers-format: {layout!r} is not one of {', '.join(ANSWER_FORMATS)}")
    from .core.console import make_console
    from .evaluation.answers import slug
    from .evaluation.run import run_eval
    from .core.models import quiet_libraries
    from .core.rundir import EVAL, is_run_dir

    console = make_console()
    quiet_libraries(console.is_terminal)
    target = Path(model)
    folder = out or (target / EVAL if target.is_dir() and is_run_dir(target) else Path("eval") / slug(model))
    run_eval(model, baselines=baseline or ["base"], questions_path=questions, judge_spec=judge, judge_model=judge_model,
             api_key_env=api_key_env, modes=modes, out=folder, limit=limit,
             sampling=Sampling(temperature, top_p, max_new_tokens, seed), console=console, answer_files=answers or [],
             answer_formats=list(dict.fromkeys(answers_format or [])), answers_only=answers_only)


@eval_app.command("score")
def eval_score(
    files: Annotated[list[Path], typer.Argument(help="Judgment files (layout detected per line): plain JSONL, FastChat llm_judge (pairwise or single), Arena-Hard-Auto, AlpacaEval annotations.", show_default=False)],
    reference: Annotated[Optional[str], typer.Option(help="The reference model for relative scores, and the baseline of FastChat's pairwise figures (show_result.py --mode pairwise-baseline).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("eval-report"),
    strict: Annotated[bool, typer.Option("--strict", help="Refuse the files if any line is malformed or out of range, instead of leaving such lines out (and listing them).")] = False,
) -> None:
    """Score judgments made elsewhere: relative score, win rates, Elo and Bradley-Terry with CIs."""
    from .core.console import make_console
    from .evaluation.run import score_files

    score_files(files, reference, out, make_console(), strict=strict)


@eval_app.command("mmlu")
def eval_mmlu(
    model: ModelArg,
    data: Annotated[Path, typer.Option(help="An MMLU-layout folder (dev/, test/ CSVs), a JSONL file of multiple-choice rows, or a hub id like cais/mmlu (online).")],
    shots: Annotated[int, typer.Option(min=0, max=5, help="Few-shot examples from the dev split.")] = 5,
    limit: Annotated[Optional[int], typer.Option(min=1, help="At most this many test questions per subject.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Multiple-choice accuracy (MMLU-style): argmax over the four letter tokens, per subject and averaged."""
    import json as json_module

    from .core.console import key_value_table, make_console
    from .evaluation.mmlu import evaluate, read_mmlu

    dev, test = read_mmlu(data)
    console = make_console(stderr=as_json)  # --json keeps stdout for the JSON object
    loaded = load_generation_model(console, model)
    result = evaluate(loaded.model, loaded.tokenizer, dev, test, shots=shots, limit=limit)
    from . import __version__

    result.update(model=model, shots=shots, qlora_version=__version__)
    if as_json:
        print(json_module.dumps(result, indent=2))
        return
    rows = [(subject, f"{entry['accuracy']:.1%} of {entry['questions']}") for subject, entry in result["subjects"].items()]
    rows += [("mean over subjects", f"{result['accuracy']:.1%}"), ("over all questions", f"{result['accuracy_over_questions']:.1%}")]
    console.print(key_value_table(f"Multiple-choice accuracy of {model} ({shots}-shot)", rows))


@eval_app.command("harness")
def eval_harness(
    model: ModelArg,
    tasks: Annotated[str, typer.Option(help="lm-evaluation-harness tasks, comma-separated: arc_easy,hellaswag, or your own (--include-path).", show_default=False)],
    num_fewshot: Annotated[Optional[int], typer.Option(min=0, help="Few-shot examples per question (default: each task's own).")] = None,
    limit: Annotated[Optional[float], typer.Option(min=0.0, help="At most this many documents per task (below 1: this fraction).")] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option("--include-path", help="A folder (or file) of task YAMLs of your own (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default: RUN_DIR/eval, else eval/<model>).")] = None,
) -> None:
    """Score a model with lm-evaluation-harness (its Python API) on the model as qlora loads it: a run as trained
    (quantized base + adapter), a merged or local model, or a hub id. Writes the harness's results JSON."""
    from .evaluation.harness import check_harness_installed, parse_tasks

    check_harness_installed()
    task_names = parse_tasks(tasks)
    from .core.console import key_value_table, make_console
    from .core.rundir import EVAL, is_run_dir
    from .evaluation.answers import slug
    from .evaluation.harness import check_tasks, evaluate, task_manager, task_scores, write_results

    console = make_console()
    manager = task_manager(list(include_path or []))
    check_tasks(manager, task_names)  # before the model loads
    loaded = load_generation_model(console, model)
    results = evaluate(loaded.model, loaded.tokenizer, manager, task_names, num_fewshot=num_fewshot,
                       limit=int(limit) if limit is not None and limit >= 1 else limit, batch_size=batch_size)
    target = Path(model)
    folder = out or (target / EVAL if target.is_dir() and is_run_dir(target) else Path("eval") / slug(model))
    written = write_results(results, folder, {"model": model, "loaded_as": loaded.description, "tasks": task_names,
                                              "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size})
    rows = [(f"{task} {name}", f"{value:.4f}") for task, metrics in task_scores(results).items()
            for name, value in metrics.items()]
    console.print(key_value_table(f"lm-evaluation-harness: {model}", rows + [("results", str(written))]))


def with_profile_default(argv: list[str]) -> list[str]:
    """`qlora train ... --profile` without a number profiles PROFILE_STEPS steps (click has no optional values)."""
    if not argv or argv[0] != "train":
        return argv
    result = list(argv)
    for index, item in enumerate(argv):
        if item == "--profile" and (index + 1 == len(argv) or not argv[index + 1].isdigit()):
            result.insert(index + 1, str(PROFILE_STEPS))
            break
    return result


@app.command()
def serve(
    model: Annotated[list[str], typer.Argument(
        help="A run directory, a merged or local model directory, a hub id, a .gguf, or smollm2-135m-instruct; "
             "or several runs trained on one base, served together (the base loaded once), each as its folder name.",
        show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="The model id clients send (default: the run's or model's folder name, a .gguf's stem, or MODEL).")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="Require `Authorization: Bearer <key>`, the key read from this environment variable.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Reply length when a request gives no max_tokens.")] = 512,
    max_batch: Annotated[int, typer.Option(min=1, help="Replies generated together (continuous batching).")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests that may wait for a free row, beyond the --max-batch that run (0: none wait); more get 503 with Retry-After.")] = 256,
    dtype: Annotated[Optional[str], typer.Option(help="Compute a merged or plain model in bfloat16, float16 or float32 (default: float32 on a CPU, so its weights are not rounded; the device's compute dtype on a GPU). A run computes in its recipe's dtype.", show_default=False)] = None,
) -> None:
    """Serve models over an OpenAI-compatible API: POST /v1/chat/completions (streamed or not), GET /v1/models."""
    from .core.models import quiet_libraries
    from .inference.serve import serve as run_server

    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype: {dtype!r} is not one of bfloat16, float16, float32")
    quiet_libraries(sys.stdout.isatty())
    run_server(model, host=host, port=port, model_name=model_name, api_key_env=api_key_env, max_tokens=max_tokens,
               max_batch=max_batch, max_queue=max_queue, dtype=dtype,
               say=lambda text: print(text, file=sys.stderr, flush=True))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print their problems and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `qlora eval MODEL ...` is `qlora eval run MODEL ...`.
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] not in EVAL_COMMANDS:
        argv.insert(1, "run")
    argv = with_profile_default(argv)
    if not sys.stderr.isatty():
        # Some of transformers' loaders (converting a GGUF file) draw plain tqdm bars, outside its own switch;
        # tqdm reads this when it is imported, so it is set before anything imports it.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        code = app(args=argv, standalone_mode=False)
        # Typer turns a Ctrl-C inside a command into a RETURNED exit code (130) when not standalone;
        # ignoring it would exit 0 without a word.
        if isinstance(code, int) and code != 0:
            if code == EXIT_INTERRUPTED:
                print("interrupted", file=sys.stderr)
            sys.exit(code)
    except UserError as error:
        print(f"error: {error.render()}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except RunFailure as failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(EXIT_RUN_FAILED)
    except RunInterrupted as interrupted:
        print(str(interrupted), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except Exception as error:
        # Usage errors (unknown flag, missing argument) come from the click that typer carries.
        if hasattr(error, "show") and getattr(error, "exit_code", None) is not None:
            error.show()
            sys.exit(EXIT_USER_ERROR)
        raise

if __name__ == "__main__":
    main()
