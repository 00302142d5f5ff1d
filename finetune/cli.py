"""The `finetune` command line.

Only typer, pydantic and yaml are imported at start-up: torch, transformers, peft, trl and
datasets cost 10+ s to import, so each command imports what it needs inside its body.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

from finetune import __version__
from finetune.data.commands import data_app
from finetune.errors import UserError

app = typer.Typer(
    name="finetune",
    help="Fine-tune large language models from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(data_app, name="data")

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

    loaded = load_recipe(recipe, overrides)
    if loaded.recipe.distributed.strategy != "none":
        if resume is not None:
            raise UserError(
                "--resume: resuming a multi-process run (distributed.strategy: "
                f"{loaded.recipe.distributed.strategy}) is not supported yet; resume it with "
                "--set distributed.strategy=none --force on one process, or start a new run"
            )
        from finetune.launch.plan import launch_training

        launch_training(loaded, overwrite=overwrite)  # re-launches through `accelerate launch`
        return
    from finetune.redact import redact
    from finetune.train import run_training

    command = ["finetune", "train", str(recipe), *(a for o in overrides for a in ("--set", o)), "--resume"]
    run_training(
        loaded, overwrite=overwrite, resume=resume, force=force, resume_command=shlex.join(redact(command)),
        ignore_memory_plan=ignore_memory_plan,
    )


@app.command("launch-plan")
def launch_plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print what `finetune train` would launch (command, environment, generated configs); start nothing."""
    from finetune.launch.plan import describe_launch
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
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Largest safetensors file (e.g. 5GB, 500MB); bigger models are sharded."
    ),
) -> None:
    """Bake an adapter (LoRA family, AdaLoRA, IA³) into its base model and save it as safetensors, verified."""
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype: expected float32, bfloat16 or float16, found {dtype!r}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)", max_shard_size):
        raise UserError(f"--max-shard-size: expected a size like 5GB or 500MB, found {max_shard_size!r}")
    from finetune.merge import run_merge

    run_merge(source, out=out, dtype=dtype, max_shard_size=max_shard_size)


ADAPTER_HELP = "Another LoRA adapter to load on the same base, as NAME=PATH (repeatable)."


@app.command()
def export(
    source: Path = typer.Argument(..., help="A run directory, a merged or full model directory, or an adapter."),
    format: str = typer.Option(..., "--format", help="gguf (llama.cpp, Ollama) or vllm (print a serve command)."),
    quant: str = typer.Option("f16", "--quant", help="GGUF weight type: f16, q8_0 or f32."),
    out: Path | None = typer.Option(None, "--out", help="GGUF file to write (default: next to the model)."),
    name: str | None = typer.Option(None, "--name", help="vllm: the adapter's served name (default: the run name)."),
) -> None:
    """Export for serving: a GGUF file (an adapter is merged first), or the vLLM command that hot-swaps it."""
    if format == "gguf":
        from finetune.export import export_gguf

        export_gguf(source, quant=quant, out=out)
    elif format == "vllm":
        if not source.exists():
            raise UserError(f"{source}: no such run or adapter directory")
        from finetune.export import vllm_command

        typer.echo(vllm_command(source, name=name))
    else:
        raise UserError(f"--format: expected gguf or vllm, found {format!r}")


@app.command()
def chat(
    source: str = typer.Argument(..., help="A run, model or adapter directory, or a model (builtin:tiny-llama)."),
    adapters: list[str] = typer.Option([], "--adapter", help=ADAPTER_HELP),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
) -> None:
    """Chat in the terminal with streaming replies; /adapter NAME, /base, /reset, /quit."""
    from finetune.inference import Sampling, load, parse_adapter_flags, resolve_source

    extra = parse_adapter_flags(adapters)
    from finetune.chat import run_chat
    from finetune.logs import stderr

    loaded = load(resolve_source(source), extra, log=stderr)
    try:
        run_chat(loaded, Sampling(max_new_tokens, temperature, top_p), system=system)
    except KeyboardInterrupt:
        stderr("")


@app.command()
def generate(
    source: str = typer.Argument(..., help="A run, model or adapter directory, or a model (builtin:tiny-llama)."),
    prompts: Path = typer.Option(
        ..., "--prompts", help="JSONL: {\"prompt\": ...} or {\"messages\": [...]}, optional \"id\"."
    ),
    out: Path = typer.Option(..., "--out", help="JSONL to append to; outputs already there are skipped (resume)."),
    adapters: list[str] = typer.Option([], "--adapter", help=ADAPTER_HELP),
    base: bool = typer.Option(False, "--base", help="Also generate with the base model (adapters off)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
) -> None:
    """Generate for every prompt with the model and each adapter, batched; rerun to resume."""
    from finetune.generate import read_prompts
    from finetune.inference import Sampling, load, parse_adapter_flags, resolve_source

    rows, extra = read_prompts(prompts), parse_adapter_flags(adapters)
    from finetune.generate import run_generate
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


@app.command("eval")
def eval_(
    source: str = typer.Argument(..., help="A run, model or adapter directory, or a model."),
    data: str | None = typer.Option(
        None, "--data", help="JSONL (messages or prompt/completion) for loss and perplexity (default: data.eval)."
    ),
    tasks: Path | None = typer.Option(
        None, "--tasks", help="JSONL of {\"prompt\", \"answer\"} rows: exact match, contains, JSON validity."
    ),
    base: bool = typer.Option(False, "--base", help="Also evaluate the base model and print a before/after table."),
    adapters: list[str] = typer.Option([], "--adapter", help=ADAPTER_HELP),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (needs lm-eval)."
    ),
    max_rows: int | None = typer.Option(None, "--max-rows", min=1, help="Use only the first N rows of each file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    out: Path | None = typer.Option(None, "--out", help="Also write the results as JSON here."),
) -> None:
    """Loss, perplexity and task metrics; with --base, a before/after table."""
    from finetune.inference import parse_adapter_flags

    extra = parse_adapter_flags(adapters)
    from finetune.evaluate import render_table, run_eval
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


def _bare_resume(argv: list[str]) -> list[str]:
    """Give a bare `--resume` its "latest" value: Typer options cannot have an optional value.

    The next word is the option's value unless it is missing, another option, or a recipe file.
    """
    from finetune.checkpoints import LATEST

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume":
            following = out[i + 1] if i + 1 < len(out) else None
            if following is None or following.startswith("-") or following.endswith((".yaml", ".yml")):
                out[i] = f"--resume={LATEST}"
    return out


def main() -> None:
    """Console entry point: user errors print a message and exit 2, never a traceback."""
    try:
        app(args=_bare_resume(sys.argv[1:]))  # standalone: click reports usage errors itself (exit 2) and exits
    except UserError as exc:
        typer.echo(f"{getattr(exc, 'label', 'error')}: {exc.render()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
