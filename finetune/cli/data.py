"""`finetune data ...`: look at and prepare a recipe's data without training.

Only typer is imported here; each command imports the ML stack inside its body.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

from finetune.cli.app import examples
from finetune.errors import UserError

data_app = typer.Typer(
    name="data",
    help="Inspect and prepare a recipe's data: what is trained, what is dropped, and why.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SET_HELP = (
    "Override a recipe value by key path, e.g. --set data.chat_template=chatml or --set data.train[0].path=my.jsonl "
    "(repeatable)."
)


def _prepare(recipe_path: Path, overrides: list[str]):
    """Load the recipe and tokenizer, then prepare (or reuse) the data; logs go to stderr."""
    from finetune.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides).recipe
    unpaired = [f"data.{split}[{i}]" for split in ("train", "eval")
                for i, spec in enumerate(getattr(recipe.data, split)) if spec.format == "unpaired_preference"]
    if unpaired:
        raise UserError(
            f"{', '.join(unpaired)}: format unpaired_preference (KTO rows) is not covered by `finetune data` yet; "
            "`finetune train` checks these rows before the model loads"
        )
    from finetune.data.prepare import prepare_datasets
    from finetune.logs import quiet_libraries, stderr
    from finetune.model.load import prepare_tokenizer
    from finetune.model.start import resolve_start

    start = resolve_start(recipe)  # model.path may name an earlier run: its tokenizer, added tokens, template
    # Libraries print to stdout on import (DeepSpeed's accelerator notice); stdout is for our output only.
    with contextlib.redirect_stdout(sys.stderr):
        quiet_libraries()
        tokenizer, _ = prepare_tokenizer(recipe, start)  # the one tokenizer set-up train uses: same cache key
        train, evaluation, audits = prepare_datasets(recipe, tokenizer, stderr)
    return recipe, tokenizer, train, evaluation, audits


def _console():
    from rich.console import Console

    console = Console(file=sys.stdout)
    # Piped output is for reading in full or grepping: no 80-column wrapping of tables and headers.
    return console if console.is_terminal else Console(file=sys.stdout, width=200)


@data_app.command(
    epilog=examples(
        "finetune data preview recipes/tiny/sft_lora.yaml -n 1",
        "finetune data preview my.yaml --split eval --json --set data.chat_template=chatml",
    )
)
def preview(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    n: int = typer.Option(3, "--examples", "-n", min=0, help="How many examples to show."),
    split: str = typer.Option("train", "--split", help="Which data to show: train or eval."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (examples with token ids and labels, audit)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Show N examples as the model sees them (trained vs masked tokens) and the label audit."""
    if split not in ("train", "eval"):
        raise UserError(f"--split: expected train or eval, found {split!r}")
    loaded, tokenizer, train, evaluation, audits = _prepare(recipe, overrides)
    dataset = train if split == "train" else evaluation
    if dataset is None:
        raise UserError(f"{recipe}: the recipe has no eval data (set data.eval or data.eval_fraction)")
    from finetune.data.preview import audit_table, dropped_lines, example_records, print_examples
    from finetune.recipe.methods import PREFERENCE_KINDS

    records = example_records(dataset, tokenizer, n, preference=loaded.method.kind in PREFERENCE_KINDS)
    if as_json:
        report = {
            "recipe": str(recipe),
            "split": split,
            "rows": len(dataset),
            "examples": records,
            "audit": [a.to_record() for a in audits],
        }
        typer.echo(json.dumps(report, ensure_ascii=False, indent=1))
        return
    console = _console()
    colour = console.is_terminal and not console.no_color
    print_examples(console, records, len(dataset), colour)
    console.print(audit_table(audits))
    for line in dropped_lines(audits):
        console.print(line, markup=False, highlight=False)


@data_app.command(
    epilog=examples("finetune data prepare recipes/tiny/sft_lora.yaml && finetune train recipes/tiny/sft_lora.yaml")
)
def prepare(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Tokenise and audit the data into the cache now, so `finetune train` starts without tokenising."""
    loaded, _, train, evaluation, audits = _prepare(recipe, overrides)
    from finetune.data.preview import audit_table, dropped_lines
    from finetune.recipe.methods import PREFERENCE_KINDS

    console = _console()
    console.print(audit_table(audits))
    for line in dropped_lines(audits):
        console.print(line, markup=False, highlight=False)
    rows = f"{len(train)} train rows" + (f", {len(evaluation)} eval rows" if evaluation is not None else "")
    if loaded.method.kind in PREFERENCE_KINDS:  # TRL tokenises preference pairs itself when the trainer is built
        typer.echo(f"checked {rows}; `finetune train {recipe}` reads them again (TRL tokenises preference pairs)")
    else:
        typer.echo(f"prepared {rows}; `finetune train {recipe}` will reuse them from the cache")
