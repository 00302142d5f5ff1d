"""Experiment trackers (`logging.report_to`): checked before the model loads, writing into the run dir.

transformers' integrations do the logging. What they lack: a clear error before any work when
a tracker's package or credentials are missing (W&B otherwise fails ~12 s into training), and
local output that lands in the run directory instead of the current directory.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import sys
from collections.abc import Callable
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe.schema import Recipe
from finetune.redact import redact
from finetune.run.layout import RunDir

PACKAGES = {"wandb": ("wandb", "pip install 'finetune-recipes[wandb]'"),
            "tensorboard": ("tensorboard", "pip install 'finetune-recipes[tensorboard]'"),
            "mlflow": ("mlflow", "pip install 'finetune-recipes[mlflow]'")}


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        )
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(found and found[2])


def check_trackers(recipe: Recipe) -> None:
    """Raise UserError if a tracker in logging.report_to cannot run here."""
    for name in recipe.logging.report_to:
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"logging.report_to: '{name}' needs the {module} package, which is not installed; "
                            f"install it with: {install}")
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    if "wandb" in recipe.logging.report_to and not offline and not _wandb_has_key():
        raise UserError(
            "logging.report_to: 'wandb' has no API key here; set WANDB_API_KEY, run `wandb login`, "
            "or log offline with WANDB_MODE=offline (sync later with `wandb sync`)"
        )


def tracker_env(run_dir: Path) -> Callable[[], None]:
    """Point the trackers' local files into the run dir (unless the user chose a place); returns the undo.

    Also redacts `sys.argv` for the run: wandb records the command line (wandb-metadata.json) and
    mlflow its first word, so a token given as `--set logging.run_name=hf_...` would reach them verbatim.
    """
    defaults = {
        "WANDB_DIR": str(run_dir),  # wandb/ (offline runs, logs)
        "TENSORBOARD_LOGGING_DIR": str(RunDir(run_dir).tracker_dir("tensorboard")),
        "MLFLOW_TRACKING_URI": RunDir(run_dir).tracker_dir("mlflow").resolve().as_uri(),
        # mlflow 3 refuses a local file store unless asked; a database store would need sqlalchemy
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    if "MLFLOW_TRACKING_URI" in os.environ:
        del defaults["MLFLOW_ALLOW_FILE_STORE"]
    added = [key for key in defaults if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    argv = list(sys.argv)
    sys.argv[:] = redact(argv)

    def restore() -> None:
        for key in added:
            os.environ.pop(key, None)
        sys.argv[:] = argv

    return restore
