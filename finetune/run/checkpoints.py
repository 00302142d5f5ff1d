"""Checkpoints that are complete or ignored, and resume that refuses to continue a different run.

transformers' Trainer writes each checkpoint (adapter or model, optimizer, scheduler, RNG states,
trainer state with the step and epoch it resumes from) straight into `checkpoint-N`, so a crash
in the middle leaves a directory that looks like any other. We add what it lacks: after the
Trainer has written everything, the files are synced to disk and a marker,
`finetune_checkpoint.json`, is written atomically next to the resolved recipe. Resume only takes
checkpoints that have the marker; one without it is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError
from finetune.run.layout import CHECKPOINT_MARKER, CHECKPOINT_NAME, RECIPE, RunDir, step_in_name

MARKER = CHECKPOINT_MARKER
LATEST = ":latest"  # the value of a bare `--resume`
# Sections that change where results go or how they are reported, never what is trained.
NOT_COMPARED_ON_RESUME = ("name", "output", "logging")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that it is either absent or complete, also after a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def commit_checkpoint(checkpoint: Path, *, step: int, epoch: float | None, samples: int, recipe_yaml: str,
                      data: list[dict[str, Any]]) -> None:
    """Mark a checkpoint the Trainer has fully written as complete (recipe copy, fsync, then the marker)."""
    (checkpoint / RECIPE).write_text(recipe_yaml, encoding="utf-8")
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file():
            _fsync(path)
    marker = {
        "step": step,
        "epoch": epoch,
        "samples_seen": samples,
        "recipe_sha256": hashlib.sha256(recipe_yaml.encode()).hexdigest(),
        "data": data,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(checkpoint / MARKER, json.dumps(marker, indent=2) + "\n")


def list_checkpoints(checkpoints_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint directories, each sorted by step."""
    if not checkpoints_dir.is_dir():
        return [], []
    found = sorted(
        (int(m.group(1)), p)
        for p in checkpoints_dir.iterdir()
        if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))
    )
    complete = [p for _, p in found if (p / MARKER).is_file()]
    incomplete = [p for _, p in found if not (p / MARKER).is_file()]
    return complete, incomplete


def resolve_resume(value: str, run_dir: Path, log) -> Path:
    """The checkpoint a `--resume [PATH]` names: the latest complete one of a run dir, or a given checkpoint."""
    if value == LATEST:
        return _latest_complete(RunDir(run_dir), log)
    from finetune.run.resolve import locate

    found = locate(value, key="--resume", local=True)
    if found.kind == "checkpoint":
        if not (found.path / MARKER).is_file():
            raise UserError(
                f"--resume: {found.path} is incomplete (no {MARKER}: the run stopped while writing it); "
                f"resume from an earlier checkpoint, or from the run directory to take the latest complete one"
            )
        return found.path
    if found.kind == "run":
        return _latest_complete(found.run, log)
    raise UserError(f"--resume: {value} is a {found.kind}, not a checkpoint or run directory")


def _latest_complete(run: RunDir, log) -> Path:
    complete, incomplete = list_checkpoints(run.checkpoints)
    newer = [p for p in incomplete if not complete or step_in_name(p) > step_in_name(complete[-1])]
    for path in newer:
        log(f"warning: skipping {path}: incomplete (the run stopped while writing it)")
    if complete:
        return complete[-1]
    from finetune.run.records import read_provenance

    provenance = read_provenance(run.provenance) if run.exists() else None
    if provenance is not None and provenance.before_start:
        raise UserError(
            f"--resume: {run.root} stopped before its first training step ({provenance.status}), so there is "
            "nothing to resume; run the same command without --resume (it replaces that run)"
        )
    raise UserError(
        f"--resume: no complete checkpoint in {run.checkpoints}"
        + (f" ({len(incomplete)} incomplete)" if incomplete else "")
        + "; set training.save_steps to write checkpoints, or start afresh with --overwrite"
    )


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was written at."""
    return json.loads((checkpoint / MARKER).read_text())["step"]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = ((f"{prefix}.{key}" if prefix else key, item) for key, item in value.items())
        return {k: v for path, item in items for k, v in _flatten(item, path).items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def resume_differences(checkpoint: Path, recipe_dict: dict[str, Any], data: list[dict[str, Any]]) -> list[str]:
    """What differs between the run a checkpoint belongs to and this one: recipe keys and data files."""
    saved = yaml.safe_load((checkpoint / RECIPE).read_text(encoding="utf-8"))
    old = {k: v for k, v in _flatten(saved).items() if not k.startswith(NOT_COMPARED_ON_RESUME)}
    new = {k: v for k, v in _flatten(recipe_dict).items() if not k.startswith(NOT_COMPARED_ON_RESUME)}
    changes = [
        f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
    saved_data = {d["key"]: d for d in json.loads((checkpoint / MARKER).read_text())["data"]}
    for item in data:
        before = saved_data.get(item["key"])
        if before and before.get("sha256") and before["sha256"] != item.get("sha256"):
            changes.append(
                f"{item['key']} ({item['path']}): file content changed since the checkpoint "
                f"(sha256 {before['sha256'][:12]}... -> {str(item.get('sha256'))[:12]}...)"
            )
    return changes


def check_resume(checkpoint: Path, recipe_dict: dict[str, Any], data: list[dict[str, Any]], *, force: bool,
                 log) -> None:
    """Refuse to resume a checkpoint of a different recipe or data, naming each change, unless `force`."""
    changes = resume_differences(checkpoint, recipe_dict, data)
    if not changes:
        return
    if force:
        for change in changes:
            log(f"warning: resuming despite a change (--force): {change}")
        return
    raise UserError(
        f"--resume: {checkpoint} was written by a different recipe or data; the resumed run would not be "
        "the run it continues. Undo the changes, start a new run (another output.dir), or pass --force",
        problems=changes,
    )


def trim_metrics(path: Path, keep_upto_step: int | None) -> None:
    """Start metrics.jsonl afresh, or for a resumed run keep the records up to its checkpoint's step.

    Steps after the checkpoint are trained again, so their old records would appear twice.
    """
    if keep_upto_step is None or not path.is_file():
        path.write_text("", encoding="utf-8")
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= keep_upto_step:
                kept.append(line + "\n")
        except (ValueError, KeyError):
            continue  # a line torn by a killed process
    path.write_text("".join(kept), encoding="utf-8")
