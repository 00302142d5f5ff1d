"""Commands on a recipe alone: validate, schema, init, plan, launch-plan (no model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from finetune.cli.app import SET_HELP, _refuse_existing, app


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


@app.command("launch-plan")
def launch_plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print what `finetune train` would launch (command, environment, generated configs); start nothing."""
    from finetune.launch.launcher import describe_launch
    from finetune.recipe import load_recipe

    typer.echo(describe_launch(load_recipe(recipe, overrides)), nl=False)


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
    from finetune.recipe import load_recipe
    from finetune.train.memory import plan_report

    loaded = load_recipe(recipe, overrides)
    text, fits = plan_report(loaded.recipe, str(recipe), gpu_memory=gpu_memory, processes=processes,
                             zero_stage=zero_stage)
    typer.echo(text)
    if fits is False:
        raise typer.Exit(1)
