"""Commands about models themselves: list the built-in models, build the tiny test model."""

from __future__ import annotations

from pathlib import Path

import typer

from finetune.cli.app import _refuse_existing, app, examples
from finetune.errors import UserError


@app.command(epilog=examples("finetune models"))
def models() -> None:
    """List the built-in models: parameters, size on disk, whether they are cached and where."""
    from finetune.model.builtin import BUILTIN_MODELS, BUILTIN_PREFIX, cache_state, models_dir

    rows = [("model", "parameters", "on disk", "cached", "where / first use")]
    for model in BUILTIN_MODELS.values():
        state, directory = cache_state(model)
        if state == "cached":
            size, where = _megabytes(_disk_bytes(directory)), str(directory)
        else:
            size = f"~{_megabytes(model.disk_bytes)}"
            where = f"{model.first_use}" + (f" (stale copy in {directory}: rebuilt on use)" if state == "stale" else "")
        state_label = {"cached": "yes", "missing": "no", "stale": "stale"}[state]
        rows.append((BUILTIN_PREFIX + model.name, f"{model.parameters / 1e6:.1f}M", size, state_label, where))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3].ljust(widths[3])]
        typer.echo("  ".join([*cells, row[4]]).rstrip())
    typer.echo(f"\nmodel cache: {models_dir()} (FINETUNE_MODEL_CACHE, else $FINETUNE_CACHE/models); "
               "use one as model.path: builtin:<name>")
    for model in BUILTIN_MODELS.values():
        typer.echo(f"  {BUILTIN_PREFIX}{model.name}: {model.summary}")


def _disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 10e6 else f"{size / 1e6:.1f} MB"


@app.command(
    "tiny-model", epilog=examples("finetune tiny-model models/tiny", "finetune tiny-model models/q --arch qwen3")
)
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
    from finetune.model.tiny import build_tiny_model

    build_tiny_model(out, arch=arch, seed=seed, pretrain_steps=pretrain_steps)
    typer.echo(f"wrote a tiny {arch} model to {out}")
