"""Data stage: read each dataset, encode it with loss masks (batched, multi-process), and audit it.

A dataset goes through one `datasets.map` that parses, checks and encodes every row; bad rows come
out flagged rather than raising, so the audit can count them ("skip") or the run can stop listing
the first few with their file and line ("error").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from finetune.data.encode import (
    NOT_EXACT,
    check_preference_batch,
    encode_sft_batch,
    preference_features,
    sft_features,
)
from finetune.data.sources import Skipped, Source, read_source
from finetune.errors import UserError
from finetune.recipe.schema import DataSection, DatasetSpec

MAX_REPORTED = 5  # bad rows listed in one error or audit entry; more would bury the first ones
ROWS_PER_PROCESS = 10_000  # below this, starting a worker process costs more than it saves


@dataclass
class Audit:
    """What one dataset contributes to training: rows, tokens, and how many of them carry loss."""

    name: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)  # reason -> {count, first}
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    split_rows: int = 0  # text rows longer than max_length, split into several sequences
    held_out: int = 0  # rows moved to the eval split by data.eval_fraction
    mixed_rows: int = 0  # rows per epoch after weight / samples
    length_p50: int = 0
    length_p95: int = 0
    length_max: int = 0
    end_of_turn: list[str] = field(default_factory=list)  # what closes trained turns, as the template writes it
    rows_without_end_of_turn: int = 0  # chat rows whose template writes nothing after a reply: no stop token
    template_date: str | None = None  # the date a chat template that prints one showed

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    @property
    def dropped_rows(self) -> int:
        return sum(entry["count"] for entry in self.dropped.values())

    def drop(self, reason: str, where: str) -> None:
        entry = self.dropped.setdefault(reason, {"count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < MAX_REPORTED:
            entry["first"].append(where)

    def set_end_of_turn(self, closings) -> None:
        """Record what closes the trained turns of the kept chat rows (None: not a chat row)."""
        seen = [c for c in closings if c is not None]
        self.end_of_turn = sorted({c for c in seen if c})[:MAX_REPORTED]
        self.rows_without_end_of_turn = sum(c == "" for c in seen)

    def set_lengths(self, lengths) -> None:
        import numpy as np

        if len(lengths):
            self.length_p50, self.length_p95 = (int(v) for v in np.percentile(lengths, [50, 95], method="lower"))
            self.length_max = int(np.max(lengths))

    def to_record(self) -> dict[str, Any]:
        """The audit as written to audit.json (with the trained fraction)."""
        record = asdict(self)
        return {"dataset": record.pop("name"), **record, "trained_fraction": round(self.trained_fraction, 4)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Audit:
        names = {f.name for f in fields(cls)}
        return cls(name=record["dataset"], **{k: v for k, v in record.items() if k in names and k != "name"})


def encode_dataset(
    spec: DatasetSpec,
    key: str,
    sources: list[Source],
    *,
    section: DataSection,
    tokenizer,
    template: str | None,
    max_length: int,
    preference: bool,
    date: str | None = None,
):
    """Encode (SFT) or check (preference) one dataset; return its good rows and its audit.

    `date`: the day a chat template that prints one shows (see finetune.data.render).
    """
    import numpy as np

    audit = Audit(name=f"{key} {spec.path}")
    skipped: list[Skipped] = []
    encoded = _map_sources(spec, key, sources, section, tokenizer, template, max_length, preference, skipped, date)
    stats = {name: encoded.data.column(name).to_numpy(zero_copy_only=False) for name in _stat_columns(preference)}
    first = stats["chunk"] == 0 if "chunk" in stats else np.ones(len(encoded), bool)  # one per input row
    bad = stats["bad"] != ""
    # rows that could not even be read (a non-UTF-8 line) were never encoded; empty files hold no row
    audit.rows = int(first.sum()) + sum(s.reason != "empty file" for s in skipped)
    for i in np.flatnonzero(bad):
        skipped.append(Skipped(str(stats["source"][i]), str(stats["bad"][i]), str(stats["detail"][i])))
    _refuse_bad_rows(skipped, section, key, spec)
    for item in skipped:
        audit.drop(item.reason, item.where)
    keep = ~bad if preference else _count_tokens(encoded, stats, ~bad, first, audit, max_length)
    audit.kept = int((keep & first).sum())
    names = ["prompt", "chosen", "rejected", "source"] if preference else ["input_ids", "labels", "source"]
    return encoded.select(np.flatnonzero(keep)).select_columns(names), audit


def _count_tokens(encoded, stats, keep, first, audit: Audit, max_length: int):
    """Drop rows left with no trained token, fill the audit's token counts; return the rows to keep."""
    import numpy as np
    import pyarrow.compute

    masked = keep & (stats["n_trained"] == 0)
    for i in np.flatnonzero(masked):
        audit.drop(f"no trained token within max_length={max_length}", str(stats["source"][i]))
    keep = keep & ~masked
    lengths = pyarrow.compute.list_value_length(encoded.data.column("input_ids")).to_numpy()
    audit.tokens = int(lengths[keep].sum())
    audit.trained_tokens = int(stats["n_trained"][keep].sum())
    audit.truncated = int(stats["truncated"][keep].sum())
    audit.split_rows = int((keep & (stats["chunk"] == 1)).sum())
    audit.set_lengths(stats["n_tokens"][keep & first])
    audit.set_end_of_turn(stats["end_of_turn"][keep & first])
    return keep


def _stat_columns(preference: bool) -> tuple[str, ...]:
    return (
        ("source", "bad", "detail")
        if preference
        else ("source", "bad", "detail", "n_trained", "n_tokens", "truncated", "chunk", "end_of_turn")
    )


def _map_sources(spec, key, sources, section, tokenizer, template, max_length, preference, skipped, date=None):
    import datasets

    parts, remaining = [], spec.max_rows
    for source in sources:
        if remaining is not None and remaining <= 0:
            break
        raw = read_source(source, spec.model_copy(update={"max_rows": remaining}), skipped)
        if remaining is not None:
            remaining -= len(raw)
        if len(raw) == 0:
            continue
        kwargs: dict[str, Any] = {"spec": spec, "label": source.label}
        if preference:
            function, features = check_preference_batch, preference_features()
        else:
            function, features = encode_sft_batch, sft_features()
            kwargs.update(tokenizer=tokenizer, template=template, train_on=section.train_on, max_length=max_length,
                          date=date)
        parts.append(
            raw.map(
                function,
                batched=True,
                with_indices=True,
                fn_kwargs=kwargs,
                remove_columns=raw.column_names,
                features=features,
                num_proc=_processes(section, len(raw)),
                # Our own cache (cache.py) decides what is reused; skip datasets' hashing of the tokenizer.
                new_fingerprint=f"{source.digest[-24:]}{os.getpid():x}{id(raw):x}"[:48],
                load_from_cache_file=False,
                desc=f"encoding {source.label}",
            )
        )
    if not parts:
        features = preference_features() if preference else sft_features()
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _processes(section: DataSection, rows: int) -> int | None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = section.num_proc or min(cores, rows // ROWS_PER_PROCESS)
    return wanted if wanted > 1 and rows >= 2 * wanted else None


def _refuse_bad_rows(skipped: list[Skipped], section: DataSection, key: str, spec: DatasetSpec) -> None:
    inexact = [s for s in skipped if s.reason == NOT_EXACT]
    if inexact:  # a recipe problem, not a bad row: skipping would quietly change what is trained
        shown = [f"{s.where}: {s.detail}" for s in inexact[:MAX_REPORTED]]
        raise UserError(
            f"{key}: the chat template cannot train {len(inexact)} row(s) of {spec.path} exactly, so nothing was "
            "trained (data.on_bad_row: skip does not skip these); each message says what to change",
            problems=shown + ([f"... and {len(inexact) - MAX_REPORTED} more"] if len(inexact) > MAX_REPORTED else []),
        )
    if not skipped or section.on_bad_row == "skip":
        return
    shown = [f"{s.where}: {s.detail}" for s in skipped[:MAX_REPORTED]]
    if len(skipped) > MAX_REPORTED:
        shown.append(f"... and {len(skipped) - MAX_REPORTED} more")
    noun = "row does" if len(skipped) == 1 else "rows do"
    raise UserError(
        f"{key}: {len(skipped)} {noun} not fit format '{spec.format}' ({spec.path}); fix them, or set "
        "data.on_bad_row: skip to leave them out (they are counted in the audit)",
        problems=shown,
    )


def check_audits(audits: list[Audit], section: DataSection) -> list[str]:
    """Raise when a dataset would train nothing; return warnings for suspiciously few trained tokens."""
    empty = [a for a in audits if a.kept == 0 or (a.tokens and a.trained_tokens == 0)]
    if empty:
        raise UserError(
            "no trained tokens: every row was masked out or dropped, so training would learn nothing",
            problems=[
                f"{a.name}: {a.rows} rows, {a.dropped_rows} dropped ({'; '.join(a.dropped) or 'labels all masked'})"
                for a in empty
            ],
        )
    warnings = []
    for audit in audits:
        if audit.rows_without_end_of_turn:
            warnings.append(
                f"{audit.name}: the chat template writes nothing after an assistant reply in "
                f"{audit.rows_without_end_of_turn} row(s), so no stop token is trained there and the fine-tuned "
                "model may not stop; set data.chat_template to a template that ends each turn"
            )
        if audit.tokens and audit.trained_fraction < section.min_trainable_fraction:
            warnings.append(
                f"{audit.name}: only {audit.trained_fraction:.1%} of tokens are trained "
                f"(below data.min_trainable_fraction={section.min_trainable_fraction}); check data.train_on, "
                "the chat template, or whether prompts are much longer than answers"
            )
    return warnings
