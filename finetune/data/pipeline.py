"""Data stage: check row shapes, encode with loss masks, truncate, and audit what will be trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.data.sources import Row, read_rows
from finetune.errors import UserError
from finetune.recipe.schema import DataSection, DatasetSpec

ROLES = {"system", "user", "assistant"}
MAX_REPORTED = 5  # bad rows listed in one error; more would bury the first ones


@dataclass
class Audit:
    """What one dataset contributes to training: rows, tokens, and how many of them carry loss."""

    name: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def percentile(self, q: float) -> int:
        if not self.lengths:
            return 0
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def drop(self, reason: str, where: str) -> None:
        self.dropped.setdefault(reason, []).append(where)


def check_row(row: Row, fmt: str) -> str | None:
    """Return what is wrong with a row's shape for its format, or None."""
    data = row.data
    if fmt == "messages":
        return _check_messages(data.get("messages"), "messages", need_assistant=True)
    if fmt == "prompt_completion":
        prompt, completion = data.get("prompt"), data.get("completion")
        if prompt is None or completion is None:
            return f"needs 'prompt' and 'completion' fields, found {sorted(data)}"
        if isinstance(prompt, str) and isinstance(completion, str):
            return None if completion.strip() else "'completion' is empty"
        if isinstance(prompt, list) and isinstance(completion, list):
            return _check_messages(prompt, "prompt", need_assistant=False) or _check_messages(
                completion, "completion", need_assistant=True
            )
        return "'prompt' and 'completion' must both be strings or both be lists of messages"
    if fmt in ("preference", "unpaired_preference"):
        from finetune.data.preference import check_preference_row

        return check_preference_row(data, fmt)
    raise AssertionError(fmt)


def _check_messages(messages: Any, key: str, *, need_assistant: bool) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{key}' must be a non-empty list of {{role, content}} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"{key}[{i}] must be an object with 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"{key}[{i}].role is {message['role']!r}; expected one of {', '.join(sorted(ROLES))}"
        if not isinstance(message["content"], str):
            return f"{key}[{i}].content must be a string"
        if message["role"] == "assistant" and not message["content"].strip():
            return f"{key}[{i}] is an empty assistant turn"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"'{key}' has no assistant turn, so nothing would be trained"
    return None


def load_checked_rows(spec: DatasetSpec, key: str) -> list[Row]:
    """Read a dataset and refuse it, naming up to five rows, if any row has the wrong shape."""
    rows = read_rows(spec)
    bad = []
    for row in rows:
        problem = check_row(row, spec.format)
        if problem:
            bad.append(f"{row.where}: {problem}")
    if bad:
        shown = bad[:MAX_REPORTED] + (
            [f"... and {len(bad) - MAX_REPORTED} more"] if len(bad) > MAX_REPORTED else []
        )
        raise UserError(
            f"{key}: {len(bad)} of {len(rows)} rows do not fit format '{spec.format}'", problems=shown
        )
    return rows


def encode_row(row: Row, fmt: str, tokenizer, template: str, train_on: str):
    """Token ids and labels (-100 where no loss) for one SFT row."""
    from finetune.data.masks import Encoded, encode_messages, encode_prompt_completion

    try:
        if fmt == "messages":
            mode = "all_assistant" if train_on == "all" else train_on
            encoded = encode_messages(tokenizer, row.data["messages"], chat_template=template, train_on=mode)
        else:
            encoded = encode_prompt_completion(
                tokenizer, row.data["prompt"], row.data["completion"], chat_template=template
            )
    except UserError as exc:
        raise UserError(f"{row.where}: {exc}", problems=exc.problems) from None
    if train_on == "all":
        encoded = Encoded(input_ids=encoded.input_ids, labels=list(encoded.input_ids))
    return encoded


def build_sft_split(
    specs: list[DatasetSpec], key: str, section: DataSection, tokenizer, template: str, max_length: int
):
    """Encode every dataset of a split into one `datasets.Dataset` of input_ids/labels, with audits."""
    import datasets

    columns: dict[str, list] = {"input_ids": [], "labels": []}
    audits = []
    for i, spec in enumerate(specs):
        audit = Audit(name=f"{key}[{i}] {spec.path}")
        for row in load_checked_rows(spec, f"{key}[{i}]"):
            audit.rows += 1
            encoded = encode_row(row, spec.format, tokenizer, template, section.train_on)
            ids, labels = encoded.input_ids, encoded.labels
            audit.lengths.append(len(ids))
            if len(ids) > max_length:
                audit.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            trained = sum(label != -100 for label in labels)
            if trained == 0:
                audit.drop(f"no trained token within max_length={max_length}", row.where)
                continue
            audit.kept += 1
            audit.tokens += len(ids)
            audit.trained_tokens += trained
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
        audits.append(audit)
    return datasets.Dataset.from_dict(columns), audits


def check_audits(audits: list[Audit], section: DataSection) -> list[str]:
    """Raise when a dataset would train nothing; return warnings for suspiciously few trained tokens."""
    empty = [a for a in audits if a.rows and a.trained_tokens == 0]
    if empty:
        raise UserError(
            "no trained tokens: every row was masked out or dropped, so training would learn nothing",
            problems=[
                f"{a.name}: {a.rows} rows, {sum(map(len, a.dropped.values()))} dropped "
                f"({'; '.join(a.dropped) or 'labels all masked'})"
                for a in empty
            ],
        )
    warnings = []
    for audit in audits:
        if audit.tokens and audit.trained_fraction < section.min_trainable_fraction:
            warnings.append(
                f"{audit.name}: only {audit.trained_fraction:.1%} of tokens are trained "
                f"(below data.min_trainable_fraction={section.min_trainable_fraction}); check data.train_on, "
                "the chat template, or whether prompts are much longer than answers"
            )
    return warnings
