"""Where a dataset's rows come from: files, folders, globs, `builtin:` samples and Hub datasets.

Each source becomes a `datasets.Dataset` of raw rows that remembers where every row came from, so
a bad row is reported as "train.jsonl:57". JSONL, JSON, CSV and TXT are read by hand for that
reason (`datasets` reports a malformed line as an Arrow error without its line number); their rows
are kept as JSON text and parsed inside the (multi-process) encoding map. Parquet and Hub datasets
are read by `datasets`, and their rows are numbered from 1.

Reading is strict and bounded: a line over MAX_ROW_BYTES, JSON nested deeper than MAX_ROW_DEPTH
or holding a lone surrogate ("\\ud800", which no UTF-8 writer can store), a CSV row with more or
fewer fields than its header, and an unclosed CSV quote are each reported with their file:line
(bad rows obey data.on_bad_row; a file that cannot be read past a point is an error).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.formats import BadRow
from finetune.errors import UserError
from finetune.recipe.schema import DatasetSpec

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
WHERE, JSON_TEXT = "__where__", "__json__"  # columns of a hand-read source
# One row (a JSONL line, a CSV record, a text paragraph) of 16 MiB is millions of tokens, more than
# any context window; a bigger one is a broken file, and reading it whole could exhaust memory.
MAX_ROW_BYTES = 16 << 20
MAX_ROW_DEPTH = 64  # chat rows nest 3-4 levels; deeper JSON is not a training row
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON text spells one


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
        table = _hand_read(_csv_rows(path, label, skipped))
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


def _lines(handle, label: str, skipped: list[Skipped]):
    """(line number, bytes) of a binary file, each at most MAX_ROW_BYTES; longer lines go to `skipped`."""
    number = 0
    while raw := handle.readline(MAX_ROW_BYTES + 1):
        number += 1
        if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
            while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass  # the rest of the oversized line, never held whole
            skipped.append(Skipped(f"{label}:{number}", "row too large", _too_large()))
            continue
        yield number, raw


def _too_large() -> str:
    return (
        f"the line is over {MAX_ROW_BYTES >> 20} MiB, more than any context window holds; split the text into "
        "several rows (or is the file not line-delimited JSON?)"
    )


def _jsonl_rows(path: Path, label: str, limit: int | None, skipped: list[Skipped]) -> list[tuple[str, str]]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in _lines(handle, label, skipped):
            if limit is not None and len(rows) >= limit:
                break
            where = f"{label}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                skipped.append(Skipped(where, "not valid UTF-8", _utf8_detail(exc)))
                continue
            if text.strip():
                rows.append((where, text))
                if limit is not None and len(rows) >= limit:
                    break
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
    except RecursionError:
        raise UserError(f"{label}:{_deep_line(text)}: {_too_deep()}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(f'{label}: expected a JSON list of row objects (or {{"data": [...]}})')
    # ASCII JSON text: a lone surrogate stays an escape here and is reported with its row when parsed
    try:
        return [(f"{label} row {i + 1}", json.dumps(item)) for i, item in enumerate(value)]
    except RecursionError:
        raise UserError(f"{label}: {_too_deep()}") from None


def _txt_rows(
    path: Path, label: str, spec: DatasetSpec, skipped: list[Skipped], limit: int | None = None
) -> list[tuple[str, str]]:
    """One row per paragraph (lines up to a blank line), tagged with the paragraph's first line."""
    field = spec.columns.get("text", "text")
    rows, lines, first, size = [], [], 0, 0

    def close() -> None:
        if size > MAX_ROW_BYTES:
            skipped.append(Skipped(f"{label}:{first}", "row too large", _too_large().replace("line", "paragraph", 1)))
        else:
            rows.append((f"{label}:{first}", json.dumps({field: "".join(lines).rstrip("\n")})))

    with path.open("rb") as handle:
        for number, raw in _lines(handle, label, skipped):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                skipped.append(Skipped(f"{label}:{number}", "not valid UTF-8", _utf8_detail(exc)))
                continue
            if line.strip():
                first = first or number
                size += len(raw)
                if size <= MAX_ROW_BYTES:
                    lines.append(line)
            elif lines or size:
                close()
                lines, first, size = [], 0, 0
                if limit is not None and len(rows) >= limit:
                    return rows
    if lines or size:
        close()
    return rows


def _csv_rows(path: Path, label: str, skipped: list[Skipped], limit: int | None = None) -> list[tuple[str, str]]:
    """CSV rows as strings, exactly as written (pandas would turn "2" into 2.0 and "NA" into null).

    Strict: every row has exactly the header's fields, and a quote that is opened is closed.
    A UTF-8 byte order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    """
    csv.field_size_limit(MAX_ROW_BYTES)  # the default (128 KiB) refuses long documents in a cell
    text = _read_utf8(path, label, prefix=None if limit is None else 4 * MAX_ROW_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[str, str]] = []
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return rows
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise UserError(f"{label}:1: the header names column(s) {repeated} more than once; rename them")
        start = reader.line_num + 1
        for record in reader:
            where = f"{label}:{start}"
            start = reader.line_num + 1
            if not record:
                continue  # a blank line
            if len(record) != len(header):
                more = len(record) > len(header)
                detail = f"{len(record)} field(s), but the header has {len(header)}" + (
                    "; a field holding a comma must be in double quotes" if more else ""
                )
                skipped.append(Skipped(where, "wrong number of fields", detail))
                continue
            rows.append((where, json.dumps(dict(zip(header, record, strict=True)))))
            if limit is not None and len(rows) >= limit:
                break
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise UserError(
                f"{label}:{start}: a double quote opened in the row starting on this line is never closed; close "
                'it, or write a quote inside a quoted field as two ("")'
            ) from None
        raise UserError(
            f"{label}:{reader.line_num}: not a valid CSV line: {exc}; a field holding quotes must itself be in double "
            'quotes, each quote inside it doubled ("")'
        ) from None
    return rows


def _read_utf8(path: Path, label: str, prefix: int | None = None) -> str:
    """The file's text (or its whole lines within the first `prefix` bytes); UserError naming the line if not UTF-8."""
    if prefix is None:
        data = path.read_bytes()
    else:
        with path.open("rb") as handle:
            data = handle.read(prefix + 1)
        if len(data) > prefix:
            data = data[: data.rfind(b"\n", 0, prefix) + 1]
    try:
        return data.decode("utf-8-sig")  # a byte order mark (Excel, Notepad) is not text
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


def parse_json_row(text: str) -> Any:
    """One row's JSON text as a value; BadRow when it is malformed, too deeply nested, or not valid Unicode."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRow("malformed JSON", f"malformed JSON at column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise BadRow("nested too deeply", _too_deep()) from None
    # Walking every value costs more than parsing; text with no more brackets than the depth limit cannot nest
    # too deeply, and a lone surrogate is either in the text or spelled as a \\udXXX escape.
    deep = text.count("[") + text.count("{") > MAX_ROW_DEPTH
    if deep or _SURROGATE.search(text) or _ESCAPED_SURROGATE.search(text):
        check_row_value(value)
    return value


def check_row_value(value: Any) -> None:
    """Raise BadRow if a parsed row nests deeper than MAX_ROW_DEPTH or holds a lone surrogate."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_ROW_DEPTH:
            raise BadRow("nested too deeply", _too_deep())
        if isinstance(item, str):
            if _SURROGATE.search(item):
                code = ord(_SURROGATE.search(item).group())
                raise BadRow(
                    "not valid Unicode",
                    f"holds a lone surrogate \\u{code:04x}, half of a UTF-16 pair, which is not text; fix the "
                    "program that wrote the file (or remove the row)",
                )
        elif isinstance(item, dict):
            stack += [(k, depth + 1) for k in item] + [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]


_JSON_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|[\[\]{}]')


def _deep_line(text: str) -> int:
    """The line where JSON text first nests deeper than a row may (for a file json.loads gave up on)."""
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        mark = token.group()
        depth += 1 if mark in "[{" else -1 if mark in "]}" else 0
        if depth > MAX_ROW_DEPTH + 1:  # + the list of rows around them
            return text.count("\n", 0, token.start()) + 1
    return 1


def _too_deep() -> str:
    return f"JSON nested more than {MAX_ROW_DEPTH} levels deep; a training row is a few levels of objects and lists"


def first_row(file: Path, spec: DatasetSpec, label: str) -> tuple[str | None, Any]:
    """Where the first row of a local JSONL/JSON/CSV/TXT file is and its value, read as training reads it.

    `finetune validate` checks this row only. Returns (None, None) for a file without rows; raises
    UserError when the file cannot be read, BadRow (with `.where`) when its first row cannot.
    """
    skipped: list[Skipped] = []
    if file.suffix == ".jsonl":
        rows = _jsonl_rows(file, label, 1, skipped)
    elif file.suffix == ".json":
        rows = _json_rows(file, label)[:1]
    elif file.suffix == ".csv":
        rows = _csv_rows(file, label, skipped, limit=1)
    else:
        rows = _txt_rows(file, label, spec, skipped, limit=1)
    if skipped:
        bad = BadRow(skipped[0].reason, skipped[0].detail)
        bad.where = skipped[0].where
        raise bad
    if not rows:
        return None, None
    where, text = rows[0]
    try:
        return where, parse_json_row(text)
    except BadRow as bad:
        bad.where = where
        raise


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
                    value = parse_json_row(item[JSON_TEXT])
                except BadRow as bad:
                    skipped.append(Skipped(item[WHERE], bad.reason, bad.detail))
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
