"""The `finetune` command line: the Typer app, its entry point, and what every command shares.

Only typer, pydantic and yaml are imported at start-up: torch, transformers, peft, trl and
datasets cost 10+ s to import, so each command imports what it needs inside its body. The
commands live in one module per stage (recipes, train, outputs, inference, models, data) and
register themselves on `app` when `finetune.cli` is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args, get_origin

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


SET_HELP = (
    "Override a recipe value by key path, e.g. --set training.learning_rate=1e-4 or "
    "--set data.train[0].path=my.jsonl (repeatable; the value is read as YAML)."
)


def examples(*commands: str) -> str:
    """A command's help epilog: example command lines, one per line."""
    return "Examples:\n" + "\n".join(f"  {command}" for command in commands)


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


def tidy_help(command):
    """Help screens without type noise: flags show no type, values a word (N, PATH, TEXT), arguments their name.

    Typer labels every option with its Python type (`<bool>`, `<list[str]>`, `<int range>`); an explicit
    metavar replaces that label, so each parameter without one gets a plain word here. Applies to every
    command, including ones added later, so no command has to spell metavars.
    """
    for param in command.params:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None  # the name says what it is; Typer adds `<path>`
        elif param.metavar is None:
            annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            param.metavar = "" if getattr(param, "is_flag", False) else _metavar(annotation)
    make_help_option = command.get_help_option

    def get_help_option(ctx):  # --help is made on demand, so it is tidied on demand
        option = make_help_option(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)
    return command


def _metavar(annotation) -> str:
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "PATH"
    return {int: "N", float: "NUMBER"}.get(annotation, "TEXT")


# Set by main(): this process is one `finetune` command, which ends with it (not the Typer app called inside a
# longer-lived process, as tests do), so `finetune train` may shape the process for its one recipe
# (finetune.train.startup).
owns_process = False


def main() -> None:
    """Console entry point: user errors print a message and exit 2, never a traceback."""
    global owns_process
    owns_process = True
    command = tidy_help(typer.main.get_command(app))
    try:
        # standalone: click reports usage errors itself (exit 2) and exits
        command(args=_bare_resume(sys.argv[1:]), prog_name="finetune")
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
