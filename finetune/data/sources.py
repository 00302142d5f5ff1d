"""Read dataset rows from local files or the Hub, each row tagged with where it came from.

JSONL is read by hand, line by line, because `datasets` reports a malformed line as an Arrow
error without its line number; users need "train.jsonl:57" to fix their data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe.schema import DatasetSpec

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Row:
    """One data row and its origin ("file.jsonl:57", "data.csv row 3")."""

    data: dict[str, Any]
    where: str


def resolve_dataset_path(spec: DatasetSpec) -> str:
    """Turn `builtin:<file>` into the shipped file's path; other paths are returned unchanged."""
    if spec.path.startswith("builtin:"):
        from finetune.tiny import resolve_data_path

        return resolve_data_path(spec.path)
    return spec.path


def check_dataset_exists(spec: DatasetSpec, key: str) -> None:
    """Fail before any model loads when a local dataset path is missing or of an unknown kind."""
    path = resolve_dataset_path(spec)
    local = Path(path)
    if local.exists():
        if local.suffix not in LOCAL_SUFFIXES:
            raise UserError(
                f"{key}.path: {path}: unsupported file type '{local.suffix}'; "
                f"use one of {', '.join(LOCAL_SUFFIXES)}"
            )
        return
    if local.suffix in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(
            f"{key}.path: no such file: {path} (relative paths are relative to the current directory)"
        )


def read_rows(spec: DatasetSpec) -> list[Row]:
    """All rows of one dataset (first `max_rows` if set)."""
    path = resolve_dataset_path(spec)
    local = Path(path)
    if local.suffix == ".jsonl" and local.is_file():
        rows = _read_jsonl(local, spec.max_rows)
    elif local.suffix == ".json" and local.is_file():
        rows = _read_json(local)
    elif local.is_file():
        rows = _read_with_datasets(
            LOCAL_SUFFIXES[local.suffix], {"data_files": str(local), "split": "train"}, path
        )
    else:
        rows = _read_with_datasets(path, {"name": spec.subset, "split": spec.split}, path)
    if not rows:
        raise UserError(f"{path}: the dataset has no rows; check the file (or split '{spec.split}')")
    return rows[: spec.max_rows] if spec.max_rows else rows


def _read_jsonl(path: Path, limit: int | None) -> list[Row]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line); re-save the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: malformed JSON at column {exc.colno}: {exc.msg}") from None
            if not isinstance(value, dict):
                raise UserError(f"{where}: each line must be a JSON object, found {type(value).__name__}")
            rows.append(Row(value, where))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8; re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(f'{path}: expected a JSON list of row objects (or {{"data": [...]}})')
    rows = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise UserError(
                f"{path} row {i + 1}: each row must be a JSON object, found {type(item).__name__}"
            )
        rows.append(Row(item, f"{path} row {i + 1}"))
    return rows


def _read_with_datasets(name: str, kwargs: dict[str, Any], label: str) -> list[Row]:
    import datasets

    try:
        table = datasets.load_dataset(name, **kwargs)
    except (
        Exception
    ) as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label}: cannot load the dataset: {first}") from None
    return [Row(dict(item), f"{label} row {i + 1}") for i, item in enumerate(table)]
