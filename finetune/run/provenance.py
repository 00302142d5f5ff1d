"""Provenance of a run: what produced it, on what base (revision or content hash), from which data.

`<run>/provenance.json` (records.Provenance) is written when the run starts (status "running") and
rewritten when it ends (completed, interrupted, failed, or stopped before its first step, with
the final metrics). records.write_provenance redacts it, so no token from the environment or the
recipe is ever written.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.data.sources import sha256_file
from finetune.recipe.schema import Recipe
from finetune.run.layout import MergedDir, RunDir
from finetune.run.records import (
    RUNNING,
    BaseIdentity,
    MergeReport,
    Provenance,
    StartRecord,
    read_provenance,
    write_provenance,
)

PACKAGES = (
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "safetensors",
    "bitsandbytes", "deepspeed", "wandb", "mlflow-skinny", "mlflow", "tensorboard",
)


def hash_data(recipe: Recipe) -> list[dict[str, Any]]:
    """One entry per dataset of the recipe: its key path, resolved path, and sha256 if it is a local file."""
    from finetune.data.sources import resolve_dataset_path

    entries = []
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split)):
            path = Path(resolve_dataset_path(spec))
            entry: dict[str, Any] = {"key": f"data.{split}[{i}]", "path": str(path)}
            if path.is_file():
                entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
            else:
                entry.update(sha256=None, note="Hub dataset: identified by id, split and subset, not hashed")
            entries.append(entry)
    return entries


def git_revision(directory: Path) -> dict[str, Any] | None:
    """HEAD commit of the git repository holding `directory` (and whether it has uncommitted changes)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        root = git("rev-parse", "--show-toplevel")
        revision = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None  # no git, not a repository, or a repository without commits
    return {"repository": root, "revision": revision, "dirty": dirty}


def base_identity(weights: str, revision: str | None, name: str | None = None) -> BaseIdentity:
    """What the base weights are: a Hub id and its revision, or a local model's content sha256 (config and weights).

    `weights` is what the run loads (model.start.Start.base: through earlier runs to the true base);
    `name` is how the recipe named it, when it named it directly (builtin:tiny-llama rather than the cache path).
    Hashing reads every weight file once (~1 GB/s: seconds for a 7B model), so a card can say exactly which
    local weights an adapter belongs to.
    """
    import hashlib

    from finetune.model.builtin import resolve_model_path
    from finetune.run.layout import MODEL_CONFIG

    path = Path(resolve_model_path(weights))
    if not path.is_dir():
        return BaseIdentity(id=name or weights, revision=revision or "main")
    if not (path / MODEL_CONFIG).is_file():
        return BaseIdentity(path=name or str(path))
    digest = hashlib.sha256()
    for file in sorted([path / MODEL_CONFIG, *path.glob("*.safetensors"), *path.glob("*.bin")]):
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return BaseIdentity(path=name or weights, sha256=digest.hexdigest())


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "finetune": __version__}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    """CPU, memory and GPUs of this machine."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {
            "version": torch.version.cuda,
            "devices": [
                {"name": props.name, "memory_bytes": props.total_memory}
                for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
            ],
        }
    return info


def start_provenance(recipe: Recipe, source: Path | None, data: list[dict[str, Any]], *,
                     resumed_from: str | None, start: StartRecord | None = None,
                     base: BaseIdentity | None = None) -> Provenance:
    """The provenance of a run as it starts; `finish_provenance` completes it."""
    return Provenance(
        finetune_version=__version__,
        status=RUNNING,
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=["finetune" if sys.argv[0].endswith(("__main__.py", "finetune")) else sys.argv[0], *sys.argv[1:]],
        recipe_file=str(source) if source else None,
        git=git_revision(source.resolve().parent) if source else None,
        resumed_from=resumed_from,
        start=start,
        base_model=base,
        recipe=recipe.model_dump(mode="json"),
        data=data,
        packages=package_versions(),
        hardware=hardware(),
    )


def finish_provenance(provenance: Provenance, status: str, metrics: dict[str, Any] | None = None) -> None:
    """Record how the run ended (status, time, and the final metrics when there are any)."""
    provenance.status = status
    provenance.finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if metrics is not None:
        provenance.metrics = metrics


def carry_into_merged(run: RunDir, merged: MergedDir, report: MergeReport) -> None:
    """Give a merged model its run's provenance, with the merge report (the card is card.carry_over's)."""
    provenance = read_provenance(run.provenance)
    if provenance is None:
        return  # a run from before provenance existed
    provenance.merge = report
    write_provenance(merged.provenance, provenance)
