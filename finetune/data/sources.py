"""Where a dataset's rows come from: files, folders, globs, `builtin:` samples and Hub datasets.

Each source becomes a `datasets.Dataset` of raw rows that remembers where every row came from, so
a bad row is reported as "train.jsonl:57". JSONL, JSON, CSV and TXT are read by hand for that
reason (`datasets` reports a malformed line as an Arrow error without its line number); their rows
are kept as JSON text and parsed inside the (multi-process) encoding map. Parquet and Hub datasets
are read by `datasets`, and their rows are numbered from 1.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe.schema import DatasetSpec

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
WHERE, JSON_TEXT = "__where__", "__json__"  # columns of a hand-read source


@dataclass
class Source:
    """One file of a dataset (or a loaded Hub dataset) and the digest of its content."""

    label: str
    digest: str
    file: Path | None = None
    table: Any = None  # a datasets.Dataset for a Hub source


@dataclass
class Skipped:
    """A row (or file) left out of a dataset, and why."""

    where: str
    reason: str
    detail: str


def resolve_dataset_path(spec: DatasetSpec) -> str:
    """Turn `builtin:<file>` into the shipped file's path; other paths are returned unchanged."""
    if spec.path.startswith("builtin:"):
        from finetune.model.builtin import resolve_data_path

        return resolve_data_path(spec.path)
    return spec.path


def is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def looks_like_hub_id(path: str) -> bool:
    """`org/name`: one slash, no suffix of a data file, not a relative or absolute path."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not path.endswith(SUFFIXES)


def local_files(spec: DatasetSpec, key: str) -> list[Path] | None:
    """The data files a spec names, sorted; None when it names a Hub dataset."""
    path = resolve_dataset_path(spec)
    local = Path(path).expanduser()
    if is_glob(path):
        files = sorted(Path(p) for p in glob.glob(str(local), recursive=True) if Path(p).is_file())
        return _supported(files, key, f"{path} matches no file")
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
        return _supported(files, key, f"the folder {path} holds no file")
    if local.is_file():
        if local.suffix not in SUFFIXES:
            raise UserError(
                f"{key}.path: {path}: unsupported file type '{local.suffix}'; use one of {', '.join(SUFFIXES)}"
            )
        return [local]
    if looks_like_hub_id(path):
        return None
    raise UserError(f"{key}.path: no such file: {path} (relative paths are relative to the current directory)")


def _supported(files: list[Path], key: str, empty: str) -> list[Path]:
    kept = [p for p in files if p.suffix in SUFFIXES]
    if not kept:
        found = f" (found {', '.join(sorted({p.suffix or p.name for p in files}))})" if files else ""
        raise UserError(f"{key}.path: {empty} of type {', '.join(SUFFIXES)}{found}")
    return kept


def check_dataset_exists(spec: DatasetSpec, key: str) -> None:
    """Fail before any model loads when a local dataset path is missing or holds no data file."""
    local_files(spec, key)


def resolve_sources(spec: DatasetSpec, key: str) -> list[Source]:
    """The sources of a dataset with content digests (Hub datasets are loaded to learn theirs)."""
    files = local_files(spec, key)
    if files is None:
        table = _load_hub(spec, key)
        label = spec.path + (f" ({spec.subset})" if spec.subset else "") + f" [{spec.split}]"
        return [Source(label=label, digest=f"hub:{table._fingerprint}", table=table)]
    if spec.path.startswith("builtin:"):  # tag rows "builtin:sample_chat.jsonl:12", not a site-packages path
        return [Source(label=spec.path, digest=sha256_file(files[0]), file=files[0])]
    return [Source(label=str(f), digest=sha256_file(f), file=f) for f in files]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (data cache keys, provenance)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_hub(spec: DatasetSpec, key: str):
    import datasets

    try:
        return datasets.load_dataset(spec.path, name=spec.subset, split=spec.split)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            " The Hub cannot be reached (offline): download the dataset where there is a network and point "
            f"{key}.path at the files, or unset HF_HUB_OFFLINE."
            if "offline" in first.lower() or isinstance(exc, ConnectionError)
            else f" Check the id, {key}.split ('{spec.split}') and {key}.subset."
        )
        raise UserError(f"{key}.path: cannot load the Hub dataset {spec.path!r}: {first}.{hint}") from None


def read_source(source: Source, spec: DatasetSpec, skipped: list[Skipped]):
    """Raw rows of one source as a `datasets.Dataset`, at most `spec.max_rows` of them.

    Rows that cannot even be read (a non-UTF-8 line, an empty file) go to `skipped`.
    """
    if source.table is not None:
        return _first(source.table, spec.max_rows)
    path = source.file
    assert path is not None
    before = len(skipped)
    label = source.label
    if path.suffix == ".jsonl":
        table = _hand_read(_jsonl_rows(path, label, spec.max_rows, skipped))
    elif path.suffix == ".json":
        table = _hand_read(_json_rows(path, label))
    elif path.suffix == ".txt":
        table = _hand_read(_txt_rows(path, label, spec, skipped))
    elif path.suffix == ".csv":
        table = _hand_read(_csv_rows(path, label))
    else:
        table = _load_file(path, label)
    if len(table) == 0 and len(skipped) == before:
        skipped.append(Skipped(label, "empty file", "the file has no rows"))
    return _first(table, spec.max_rows)


def _first(table, limit: int | None):
    return table.select(range(min(limit, len(table)))) if limit is not None and limit < len(table) else table


def _hand_read(rows: list[tuple[str, str]]):
    import datasets

    features = datasets.Features({WHERE: datasets.Value("string"), JSON_TEXT: datasets.Value("string")})
    return datasets.Dataset.from_dict({WHERE: [w for w, _ in rows], JSON_TEXT: [t for _, t in rows]}, features=features)


def _jsonl_rows(path: Path, label: str, limit: int | None, skipped: list[Skipped]) -> list[tuple[str, str]]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            where = f"{label}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                skipped.append(Skipped(where, "not valid UTF-8", _utf8_detail(exc)))
                continue
            if text.strip():
                rows.append((where, text))
    return rows


def _json_rows(path: Path, label: str) -> list[tuple[str, str]]:
    text = _read_utf8(path, label)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{label}:{exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg} "
            "(a broken .json file cannot be read past the error; JSONL files can skip bad lines)"
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(f'{label}: expected a JSON list of row objects (or {{"data": [...]}})')
    return [(f"{label} row {i + 1}", json.dumps(item, ensure_ascii=False)) for i, item in enumerate(value)]


def _txt_rows(path: Path, label: str, spec: DatasetSpec, skipped: list[Skipped]) -> list[tuple[str, str]]:
    """One row per paragraph (lines up to a blank line), tagged with the paragraph's first line."""
    field = spec.columns.get("text", "text")
    rows, lines, first = [], [], 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                skipped.append(Skipped(f"{label}:{number}", "not valid UTF-8", _utf8_detail(exc)))
                continue
            if line.strip():
                first = first or number
                lines.append(line)
            elif lines:
                rows.append((f"{label}:{first}", json.dumps({field: "".join(lines).rstrip("\n")})))
                lines, first = [], 0
    if lines:
        rows.append((f"{label}:{first}", json.dumps({field: "".join(lines).rstrip("\n")})))
    return rows


def _csv_rows(path: Path, label: str) -> list[tuple[str, str]]:
    """CSV rows as strings, exactly as written (pandas would turn "2" into 2.0 and "NA" into null)."""
    lines = io.StringIO(_read_utf8(path, label), newline="")
    reader = csv.DictReader(lines)
    rows, line = [], 2  # the header is line 1
    for row in reader:
        rows.append((f"{label}:{line}", json.dumps(row, ensure_ascii=False)))
        line = reader.line_num + 1
    return rows


def _read_utf8(path: Path, label: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{label}:{line}: {_utf8_detail(exc)} (the whole file must be UTF-8)") from None


def _utf8_detail(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {exc.start + 1} of the line); re-save the file as UTF-8"


def _load_file(path: Path, label: str):
    import datasets

    try:
        return datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        raise UserError(f"{label}: cannot read the file: {_first_line(cause)}") from None
    except Exception as exc:  # pyarrow and pandas raise many types for broken files
        if path.stat().st_size == 0 or "empty" in str(exc).lower():
            return _hand_read([])
        raise UserError(f"{label}: cannot read the file: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Row:
    """One raw data row and where it came from ("file.jsonl:57", "org/name [train] row 3")."""

    data: dict[str, Any]
    where: str


def read_rows(spec: DatasetSpec, key: str = "data") -> list[Row]:
    """Every raw row of a dataset as a dict with its origin, for code that needs rows, not tokens.

    Rows that cannot be read at all (malformed JSON, a non-UTF-8 line, an empty file) are an error
    naming the first few of them: callers of this function have no skip policy.
    """
    rows: list[Row] = []
    skipped: list[Skipped] = []
    for source in resolve_sources(spec, key):
        table = read_source(source, spec, skipped)
        if WHERE in table.column_names:
            for item in table:
                try:
                    value = json.loads(item[JSON_TEXT])
                except json.JSONDecodeError as exc:
                    skipped.append(
                        Skipped(item[WHERE], "malformed JSON", f"malformed JSON at column {exc.colno}: {exc.msg}")
                    )
                    continue
                if not isinstance(value, dict):
                    skipped.append(Skipped(item[WHERE], "not an object", "each row must be a JSON object"))
                    continue
                rows.append(Row(value, item[WHERE]))
        else:
            rows += [Row(dict(item), f"{source.label} row {i + 1}") for i, item in enumerate(table)]
    if skipped:
        raise UserError(
            f"{key}: {len(skipped)} row(s) cannot be read",
            problems=[f"{s.where}: {s.detail}" for s in skipped[:5]],
        )
    return rows
