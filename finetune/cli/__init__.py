"""The `finetune` command line (see `finetune.cli.app`); importing this package registers every command."""

from finetune.cli import recipes, train, outputs, inference, models, data  # noqa: F401, I001  (registration order = help order)
from finetune.cli.app import app, main

app.add_typer(data.data_app, name="data")

__all__ = ["app", "main"]
