"""The command line: parses arguments and calls one stage function per command.

Stays thin and imports nothing heavy at module level: `qlora --help` and `qlora validate` never
import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EXIT_USER_ERROR, UserError

app = typer.Typer(
    name="qlora",
    help="Fine-tune large language models with QLoRA, driven by YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe key: --set training.learning_rate=1e-4 (repeatable)."),
]
OutputDirOption = Annotated[Optional[Path], typer.Option("--output-dir", help="Run directory (overrides output.dir).")]


@app.command()
def validate(recipe: RecipeArg, set_: SetOption = None, output_dir: OutputDirOption = None) -> None:
    """Check a recipe and print it resolved, without loading anything."""
    from .console import make_console, recipe_table
    from .recipe import load_recipe

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
) -> None:
    """Fine-tune a model as the recipe says and write the run directory."""
    from .console import make_console
    from .recipe import load_recipe

    resolved = load_recipe(recipe, set_ or [], output_dir)
    from .train import run_training

    run_training(resolved, overwrite=overwrite, console=make_console())


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print their problems and exit 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as error:
        print(f"error: {error.render()}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
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
