"""The `finetune` command line: the Typer app, its entry point, and what every command shares.

Only typer, pydantic and yaml are imported at start-up: torch, transformers, peft, trl and
datasets cost 10+ s to import, so each command imports what it needs inside its body. The
commands live in one module per stage (recipes, train, outputs, inference, models, data) and
register themselves on `app` when `finetune.cli` is imported.
"""

from __future__ import annotations

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


def _refuse_existing(path: Path) -> None:
    if path.exists() and (path.is_file() or any(path.iterdir())):
        raise UserError(
            f"{path}: already exists; choose another path or remove it first (nothing was written)"
        )


def _bare_resume(argv: list[str]) -> list[str]:
    """Give a bare `--resume` its "latest" value: Typer options cannot have an optional value.

    The next word is the option's value unless it is missing, another option, or a recipe file.
    """
    from finetune.run.checkpoints import LATEST

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
        typer.echo("interrupted (Ctrl-C)", err=True)
        sys.exit(130)
    except SystemExit as exc:
        # Typer turns a Ctrl-C inside a command into a silent exit 130; say what happened, in one line.
        if exc.code == 130 and _caused_by_ctrl_c(exc):
            typer.echo("interrupted (Ctrl-C)", err=True)
        raise


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
