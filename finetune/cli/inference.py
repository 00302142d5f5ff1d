"""Commands that run a model: chat, generate, eval."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from finetune.cli.app import app, examples

ADAPTER_HELP = "Another LoRA adapter to load on the same base, as NAME=PATH (repeatable)."
MAX_NEW_HELP = "Most tokens generated per reply."
TOP_P_HELP = "Nucleus sampling: sample from the smallest set of tokens whose probability adds up to this (1: off)."
BATCH_HELP = "Prompts (or rows) run together in one batch."
TEMPERATURE_HELP = "Sampling temperature; 0: greedy (always the likeliest token)."


@app.command(
    epilog=examples(
        "finetune chat runs/tiny-sft-lora",
        "finetune chat runs/tiny-dpo-lora --adapter sft=runs/tiny-sft-lora --system 'Be brief.'",
    )
)
def chat(
    source: str = typer.Argument(..., help="A run, model or adapter directory, or a model (builtin:tiny-llama)."),
    adapters: list[str] = typer.Option([], "--adapter", metavar="NAME=PATH", help=ADAPTER_HELP),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help=MAX_NEW_HELP),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help=TEMPERATURE_HELP),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help=TOP_P_HELP),
) -> None:
    """Chat in the terminal with streaming replies; /help lists the commands (/adapter NAME, /base, /reset, /quit)."""
    from finetune.inference.load import Sampling, load, parse_adapter_flags, resolve_source

    extra = parse_adapter_flags(adapters)
    from finetune.inference.chat import run_chat
    from finetune.logs import stderr

    loaded = load(resolve_source(source), extra, log=stderr)
    try:
        run_chat(loaded, Sampling(max_new_tokens, temperature, top_p), system=system)
    except KeyboardInterrupt:
        stderr("")


@app.command(
    epilog=examples(
        "finetune generate runs/tiny-sft-lora --prompts prompts.jsonl --out outputs.jsonl --base",
    )
)
def generate(
    source: str = typer.Argument(..., help="A run, model or adapter directory, or a model (builtin:tiny-llama)."),
    prompts: Path = typer.Option(
        ..., "--prompts", help="JSONL: {\"prompt\": ...} or {\"messages\": [...]}, optional \"id\"."
    ),
    out: Path = typer.Option(..., "--out", help="JSONL to append to; outputs already there are skipped (resume)."),
    adapters: list[str] = typer.Option([], "--adapter", metavar="NAME=PATH", help=ADAPTER_HELP),
    base: bool = typer.Option(False, "--base", help="Also generate with the base model (adapters off)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help=MAX_NEW_HELP),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help=TEMPERATURE_HELP),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help=TOP_P_HELP),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help=BATCH_HELP),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
) -> None:
    """Generate for every prompt with the model and each adapter, batched; rerun to resume."""
    from finetune.inference.generate import read_prompts
    from finetune.inference.load import Sampling, load, parse_adapter_flags, resolve_source

    rows, extra = read_prompts(prompts), parse_adapter_flags(adapters)
    from finetune.inference.generate import run_generate
    from finetune.logs import stderr

    loaded = load(resolve_source(source), extra, log=stderr)
    import torch

    torch.manual_seed(seed)
    try:
        written = run_generate(
            loaded, rows, out, Sampling(max_new_tokens, temperature, top_p), batch_size=batch_size, with_base=base
        )
    except KeyboardInterrupt:
        stderr(f"interrupted; finished batches are in {out}: run the same command again to resume")
        raise typer.Exit(130) from None
    stderr(f"wrote {written} outputs to {out}")


@app.command(
    "eval",
    epilog=examples(
        "finetune eval runs/tiny-sft-lora --base",
        "finetune eval runs/tiny-sft-lora --data held_out.jsonl --tasks qa.jsonl --out results.json",
    ),
)
def eval_(
    source: str = typer.Argument(..., help="A run, model or adapter directory, or a model."),
    data: str | None = typer.Option(
        None, "--data", help="JSONL (messages or prompt/completion) for loss and perplexity (default: data.eval)."
    ),
    tasks: Path | None = typer.Option(
        None, "--tasks", help="JSONL of {\"prompt\", \"answer\"} rows: exact match, contains, JSON validity."
    ),
    base: bool = typer.Option(False, "--base", help="Also evaluate the base model and print a before/after table."),
    adapters: list[str] = typer.Option([], "--adapter", metavar="NAME=PATH", help=ADAPTER_HELP),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (needs lm-eval)."
    ),
    max_rows: int | None = typer.Option(None, "--max-rows", min=1, help="Use only the first N rows of each file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens generated per task answer."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help=BATCH_HELP),
    out: Path | None = typer.Option(None, "--out", help="Also write the results as JSON here."),
) -> None:
    """Loss, perplexity and task metrics; with --base, a before/after table."""
    from finetune.inference.load import parse_adapter_flags

    extra = parse_adapter_flags(adapters)
    from finetune.inference.evaluate import render_table, run_eval
    from finetune.logs import stderr

    results = run_eval(
        source, data=data, tasks_file=tasks, with_base=base, extra_adapters=extra, max_rows=max_rows,
        batch_size=batch_size, max_new_tokens=max_new_tokens,
        lm_eval_tasks=[t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else None, log=stderr,
    )
    typer.echo(render_table(results))
    if out is not None:
        out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        stderr(f"wrote {out}")
