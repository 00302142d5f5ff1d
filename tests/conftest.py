"""Test settings: offline, one thread, the tiny model built once per session into a temp cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a Hub id would otherwise hang ~50 s before failing
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One FINETUNE_CACHE for the session, so builtin:tiny-llama is built once."""
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("finetune-cache"))
    yield


@pytest.fixture(scope="session")
def torch_one_thread():
    import torch

    torch.set_num_threads(1)
    return torch


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def invoke_cli(*args: str, input: str | None = None):
    """Run a finetune command in this process: the same Typer app, argument parsing and error handling as
    the console entry point (`finetune.cli.app.main`), without paying the ML imports again per command."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.cli.app import _bare_resume
    from finetune.errors import UserError

    result = CliRunner().invoke(app, _bare_resume([str(a) for a in args]), input=input)
    code, err = result.exit_code, result.stderr
    if isinstance(result.exception, UserError):
        code = result.exception.exit_code
        err += f"{getattr(result.exception, 'label', 'error')}: {result.exception.render()}\n"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=code, stdout=result.stdout, stderr=err)
