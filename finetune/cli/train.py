"""`finetune train`: one process here, or several through `accelerate launch`."""

from __future__ import annotations

from pathlib import Path

import typer

from finetune.cli.app import SET_HELP, app, examples


@app.command(
    epilog=examples(
        "finetune train recipes/tiny/sft_lora.yaml",
        "finetune train my.yaml --set training.max_steps=100 --set output.dir=runs/try2",
        "finetune train my.yaml --resume",
    )
)
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Allow writing into an existing, non-empty run dir."
    ),
    resume: str | None = typer.Option(
        None,
        "--resume",
        metavar="[PATH]",
        help="Continue from the latest complete checkpoint of the run dir, or from PATH (a checkpoint "
        "or a run dir). Put it after RECIPE.",
    ),
    force: bool = typer.Option(
        False, "--force", help="With --resume: continue even if the recipe or data changed since the checkpoint."
    ),
    ignore_memory_plan: bool = typer.Option(
        False, "--ignore-memory-plan", help="Train even if the memory plan (finetune plan) says it will not fit."
    ),
) -> None:
    """Train a model as the recipe says (SFT, DPO, ORPO or KTO; LoRA, QLoRA or full; one process or several).

    Ctrl-C saves a checkpoint."""
    import shlex

    from finetune.recipe import load_recipe
    from finetune.train.interrupt import Stage, interruptible

    with interruptible(Stage("reading the recipe", "nothing was written; run the same command again")):
        loaded = load_recipe(recipe, overrides)
    from finetune.redact import redact
    from finetune.train.startup import skip_unused_packages

    command = ["finetune", "train", str(recipe), *(a for o in overrides for a in ("--set", o)), "--resume"]
    if loaded.recipe.distributed.strategy != "none":
        from finetune.launch.launcher import launch_training

        # re-launches through `accelerate launch`; every process resumes the checkpoint the launcher picked
        launch_training(loaded, overwrite=overwrite, resume=resume, force=force,
                        resume_command=shlex.join(redact(command)))
        return
    from finetune.cli.app import owns_process  # read now: main() set it before any command ran

    if owns_process:  # before anything imports transformers: this process runs one recipe
        skip_unused_packages(loaded.recipe)
    from finetune.train.run import run_training

    run_training(
        loaded, overwrite=overwrite, resume=resume, force=force, resume_command=shlex.join(redact(command)),
        ignore_memory_plan=ignore_memory_plan,
    )
