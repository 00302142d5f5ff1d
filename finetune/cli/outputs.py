"""Commands on a finished run: merge the adapter into its base, export for llama.cpp or vLLM."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from finetune.cli.app import app, examples
from finetune.errors import UserError


@app.command(
    epilog=examples("finetune merge runs/tiny-sft-lora", "finetune merge runs/my-run --dtype bfloat16 --out merged/")
)
def merge(
    source: str = typer.Argument(
        ..., help="A run directory (from `finetune train`), one of its checkpoints, or an adapter directory."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: <run>/merged)."),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="Save in this dtype (float32, bfloat16, float16). Default: the base model's dtype.",
    ),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Largest safetensors file (e.g. 5GB, 500MB); bigger models are sharded."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier merge in the output directory."),
    keep_failed: bool = typer.Option(
        False, "--keep-failed", help="Keep the merge even if it fails the merge check (still exits non-zero)."
    ),
) -> None:
    """Bake an adapter (LoRA family, AdaLoRA, IA³) into its base model, save it as safetensors, verify and gate it."""
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype: expected float32, bfloat16 or float16, found {dtype!r}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)", max_shard_size):
        raise UserError(f"--max-shard-size: expected a size like 5GB or 500MB, found {max_shard_size!r}")
    from finetune.merge.bake import run_merge

    run_merge(source, out=out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
              keep_failed=keep_failed)


@app.command(
    epilog=examples(
        "finetune export runs/tiny-sft-lora --format gguf --quant q8_0",
        "finetune export runs/tiny-sft-lora --format vllm",
    )
)
def export(
    source: str = typer.Argument(..., help="A run directory, a merged or full model directory, or an adapter."),
    format: str = typer.Option(..., "--format", help="gguf (llama.cpp, Ollama) or vllm (print a serve command)."),
    quant: str = typer.Option("f16", "--quant", help="GGUF weight type: f16, bf16, q8_0 or f32."),
    out: Path | None = typer.Option(None, "--out", help="GGUF file to write (default: next to the model)."),
    name: str | None = typer.Option(None, "--name", help="vllm: the adapter's served name (default: the run name)."),
) -> None:
    """Export for serving: a GGUF file (an adapter is merged first), or the vLLM command that hot-swaps it."""
    if format == "gguf":
        from finetune.export.gguf import export_gguf

        export_gguf(source, quant=quant, out=out)
    elif format == "vllm":
        from finetune.export.vllm import vllm_command

        typer.echo(vllm_command(source, name=name))
    else:
        raise UserError(f"--format: expected gguf or vllm, found {format!r}")
