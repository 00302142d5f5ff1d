"""Commands on a recipe alone: validate, schema, init, plan, launch-plan (no model loads)."""

from __future__ import annotations

from pathlib import Path

import typer

from finetune.cli.app import SET_HELP, _refuse_existing, app, examples
from finetune.errors import UserError


@app.command(
    help="Check a recipe and what it points at, then print it fully resolved.\n\n"
    "Checks keys and values, then everything that needs no model: data files exist and their first row fits "
    "the format; model.path is a model folder, an earlier run or a known builtin: name; the chat template and "
    "distributed.config exist; output.dir is not a file; trackers and quantisation are installed. "
    "`finetune train` runs the same checks before it writes anything.\n\n"
    "Never uses the network: Hub ids are listed as not checked (with HF_HUB_OFFLINE=1 they must be in the "
    "local Hub cache).",
    epilog=examples(
        "finetune validate recipes/tiny/sft_lora.yaml",
        "finetune validate my.yaml --set training.learning_rate=1e-4 --set data.train[0].path=my.jsonl",
    ),
)
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Check a recipe and what it points at (recipe.inputs.check_inputs), then print it resolved."""
    from finetune.recipe import load_recipe
    from finetune.recipe.dump import dump_recipe
    from finetune.recipe.inputs import check_inputs

    loaded = load_recipe(recipe, overrides)
    notes = check_inputs(loaded)
    typer.echo(dump_recipe(loaded.recipe), nl=False)
    for note in notes:
        typer.echo(f"# note: {note}", err=True)
    typer.echo(f"# OK: {recipe} is valid", err=True)


@app.command(
    help="Print the recipe JSON Schema for editors (every key described; base: and partial sections allowed).\n\n"
    "The same schema ships as docs/recipe.schema.json, which the shipped recipes name on their first line. "
    "A schema written earlier by this command is overwritten; any other existing file needs --force.",
    epilog=examples("finetune schema --out recipe.schema.json", "finetune schema > docs/recipe.schema.json")
    + "\n\nThen put `# yaml-language-server: $schema=recipe.schema.json` on a recipe's first line.",
)
def schema(
    out: Path | None = typer.Option(None, "--out", help="Write to this file instead of standard output."),
    force: bool = typer.Option(
        False, "--force", help="With --out: overwrite a file that is not a schema written by `finetune schema`."
    ),
) -> None:
    """Print (or write) the editor schema (recipe.editor_schema)."""
    from finetune.recipe.editor_schema import editor_schema_text, is_our_schema

    text = editor_schema_text()
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.is_dir():
        raise UserError(f"--out: {out} is a directory; give a file name, e.g. {out / 'recipe.schema.json'}")
    if out.exists() and not force and not is_our_schema(out.read_text(encoding="utf-8", errors="replace")):
        raise UserError(f"--out: {out} exists and is not a schema written by `finetune schema`; pass --force to "
                        "overwrite it, or choose another path (nothing was written)")
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {out}", err=True)


@app.command(epilog=examples("finetune init", "finetune init my-run.yaml && finetune validate my-run.yaml"))
def init(
    path: Path = typer.Argument(Path("recipe.yaml"), help="Where to write the starter recipe."),
) -> None:
    """Write a commented starter recipe that trains the built-in tiny model on the sample data."""
    from importlib.resources import files

    _refuse_existing(path)
    path.write_text(files("finetune.resources").joinpath("starter.yaml").read_text(encoding="utf-8"))
    typer.echo(f"wrote {path}; try: finetune validate {path} && finetune train {path}")


@app.command(
    "launch-plan",
    help="Print what `finetune train` would launch (command, environment, generated configs); start nothing.\n\n"
    "Plans for the machines that will run it: what this machine lacks (GPUs, cores, packages) is a warning in "
    "the plan, not a refusal.",
    epilog=examples(
        "finetune launch-plan recipes/tiny/sft_lora_zero3.yaml",
        "finetune launch-plan my.yaml --set distributed.num_processes=8",
    ),
)
def launch_plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Print the launch plan (launch.launcher.describe_launch)."""
    from finetune.launch.launcher import describe_launch
    from finetune.recipe import load_recipe

    typer.echo(describe_launch(load_recipe(recipe, overrides)), nl=False)


@app.command(
    epilog=examples(
        "finetune plan recipes/7b/qlora.yaml --gpu-memory 24GiB",
        "finetune plan my.yaml --processes 8 --zero-stage 3 --gpu-memory 80GB",
    )
)
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
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
