"""The `finetune` command line.

Only typer, pydantic and yaml are imported at start-up: torch, transformers, peft, trl and
datasets cost 10+ s to import, so each command imports what it needs inside its body.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from finetune import __version__
from finetune.errors import UserError

app = typer.Typer(
    name="finetune",
    help="Fine-tune large language models from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a recipe value by key path, e.g. --set training.learning_rate=1e-4 (repeatable)."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Fine-tune large language models from one YAML recipe."""


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a recipe and print it fully resolved (defaults, base recipes, overrides, interpolation)."""
    from finetune.recipe import load_recipe
    from finetune.recipe.dump import dump_recipe

    loaded = load_recipe(recipe, overrides)
    typer.echo(dump_recipe(loaded.recipe), nl=False)
    typer.echo(f"# OK: {recipe} is valid", err=True)


@app.command()
def schema(
    out: Path | None = typer.Option(None, "--out", help="Write to this file instead of standard output."),
) -> None:
    """Print the recipe JSON Schema (for `# yaml-language-server: $schema=...` in editors)."""
    from finetune.recipe.schema import Recipe

    text = json.dumps(Recipe.model_json_schema(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    _refuse_existing(out)
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {out}", err=True)


@app.command()
def init(
    path: Path = typer.Argument(Path("recipe.yaml"), help="Where to write the starter recipe."),
) -> None:
    """Write a commented starter recipe that trains the built-in tiny model on the sample data."""
    from importlib.resources import files

    _refuse_existing(path)
    path.write_text(files("finetune.resources").joinpath("starter.yaml").read_text(encoding="utf-8"))
    typer.echo(f"wrote {path}; try: finetune validate {path} && finetune train {path}")


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Allow writing into an existing, non-empty run dir."
    ),
    force: bool = typer.Option(False, "--force", help="Train even if the memory plan says it will not fit."),
) -> None:
    """Train a model as the recipe says (SFT or DPO; LoRA, QLoRA or full)."""
    from finetune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    from finetune.train import run_training

    run_training(loaded, overwrite=overwrite, force=force)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    gpu_memory: str | None = typer.Option(
        None, "--gpu-memory", help="Plan for a GPU of this size (e.g. 24GiB, 80GB); default: this machine."
    ),
    processes: int | None = typer.Option(None, "--processes", min=1, help="Data-parallel processes."),
    zero_stage: int | None = typer.Option(
        None, "--zero-stage", min=0, max=3, help="Shard optimizer (1), + gradients (2), + weights (3, or FSDP)."
    ),
) -> None:
    """Estimate peak memory per process from the model's config alone (no weights), and whether it fits."""
    from finetune.plan import plan_report
    from finetune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    text, fits = plan_report(loaded.recipe, str(recipe), gpu_memory=gpu_memory, processes=processes,
                             zero_stage=zero_stage)
    typer.echo(text)
    if fits is False:
        raise typer.Exit(1)


@app.command()
def merge(
    source: Path = typer.Argument(
        ..., help="A run directory (from `finetune train`) or an adapter directory."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: <run>/merged)."),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="Save in this dtype (float32, bfloat16, float16). Default: the base model's dtype.",
    ),
) -> None:
    """Bake a LoRA/QLoRA adapter into its base model and save it as safetensors, verified."""
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype: expected float32, bfloat16 or float16, found {dtype!r}")
    from finetune.merge import run_merge

    run_merge(source, out=out, dtype=dtype)


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the model and tokenizer into."),
    arch: str = typer.Option("llama", "--arch", help="llama or qwen3."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation and pretraining batches."),
    pretrain_steps: int = typer.Option(
        0, "--pretrain-steps", min=0, help="Plain-text pretraining steps on the sample data (builtin models: 200)."
    ),
) -> None:
    """Build a deterministic tiny model with a BPE tokenizer, offline (random weights unless pretrained)."""
    if arch not in ("llama", "qwen3"):
        raise UserError(f"--arch: expected llama or qwen3, found {arch!r}")
    _refuse_existing(out)
    from finetune.tiny import build_tiny_model

    build_tiny_model(out, arch=arch, seed=seed, pretrain_steps=pretrain_steps)
    typer.echo(f"wrote a tiny {arch} model to {out}")


def _refuse_existing(path: Path) -> None:
    if path.exists() and (path.is_file() or any(path.iterdir())):
        raise UserError(
            f"{path}: already exists; choose another path or remove it first (nothing was written)"
        )


def main() -> None:
    """Console entry point: user errors print a message and exit 2, never a traceback."""
    try:
        app()  # standalone: click reports usage errors itself (exit 2) and exits
    except UserError as exc:
        typer.echo(f"error: {exc.render()}", err=True)
        sys.exit(exc.exit_code)
