"""Commands about models themselves: build the tiny test model."""

from __future__ import annotations

from pathlib import Path

import typer

from finetune.cli.app import _refuse_existing, app, examples
from finetune.errors import UserError


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
