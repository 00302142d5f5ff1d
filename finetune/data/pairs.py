"""Preference data: row shapes for DPO/ORPO (pairs) and KTO (unpaired), and the rows handed to TRL.

TRL's preference trainers tokenise prompt/chosen/rejected themselves (with the chat template for
conversational rows), so this stage only checks shapes, unpairs pairs for KTO, and counts.
"""

from __future__ import annotations

from typing import Any

from finetune.data.pipeline import MAX_REPORTED, Audit
from finetune.data.sources import Row, read_rows
from finetune.errors import UserError
from finetune.recipe.schema import DataSection, DatasetSpec, Recipe

ROLES = ("system", "user", "assistant")
PAIR_KEYS = ("prompt", "chosen", "rejected")
UNPAIRED_KEYS = ("prompt", "completion", "label")


def load_checked_rows(spec: DatasetSpec, key: str) -> list[Row]:
    """Read a preference dataset and refuse it, naming up to five rows, if any row has the wrong shape."""
    rows = read_rows(spec, key)
    bad = [f"{row.where}: {problem}" for row in rows if (problem := check_preference_row(row.data, spec.format))]
    if bad:
        more = [f"... and {len(bad) - MAX_REPORTED} more"] if len(bad) > MAX_REPORTED else []
        raise UserError(
            f"{key}: {len(bad)} of {len(rows)} rows do not fit format '{spec.format}'",
            problems=bad[:MAX_REPORTED] + more,
        )
    return rows


def _check_messages(messages: Any, key: str, *, need_assistant: bool) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{key}' must be a non-empty list of {{role, content}} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"{key}[{i}] must be an object with 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"{key}[{i}].role is {message['role']!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"{key}[{i}].content must be a string"
        if message["role"] == "assistant" and not message["content"].strip():
            return f"{key}[{i}] is an empty assistant turn"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"'{key}' has no assistant turn, so nothing would be trained"
    return None


def check_preference_row(data: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with a preference or unpaired_preference row's shape, or None."""
    keys = PAIR_KEYS if fmt == "preference" else UNPAIRED_KEYS
    missing = [k for k in keys if k not in data]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}" + _shape_hint(data, fmt)
    if fmt == "unpaired_preference" and not isinstance(data["label"], bool):
        return f"'label' must be true (desirable) or false (undesirable), found {data['label']!r}"
    texts = keys[:3] if fmt == "preference" else keys[:2]
    kinds = {type(data[k]) for k in texts}
    if kinds == {str}:
        empty = [k for k in texts[1:] if not data[k].strip()]
        if empty:
            return f"{' and '.join(repr(k) for k in empty)} {'is' if len(empty) == 1 else 'are'} empty"
    elif kinds == {list}:
        problem = _check_messages(data["prompt"], "prompt", need_assistant=False)
        for key in texts[1:]:
            problem = problem or _check_messages(data[key], key, need_assistant=True)
        if problem:
            return problem
    else:
        return f"{', '.join(repr(k) for k in texts)} must all be strings or all be lists of messages"
    if fmt == "preference" and data["chosen"] == data["rejected"]:
        return "'chosen' and 'rejected' are identical, so the pair prefers nothing"
    return None


def _shape_hint(data: dict[str, Any], fmt: str) -> str:
    if "messages" in data:
        return " (this is a 'messages' row, SFT data; train it with method.kind: sft)"
    if fmt == "preference" and {"completion", "label"} <= data.keys():
        return " (this is an unpaired row: use format: unpaired_preference with method.kind: kto)"
    if fmt == "unpaired_preference" and {"chosen", "rejected"} <= data.keys():
        return " (this is a preference pair: use format: preference)"
    if "completion" in data:
        return " (this is a prompt/completion row, SFT data; train it with method.kind: sft)"
    return f"; found keys {sorted(data)}"


def check_local_preference_data(recipe: Recipe) -> None:
    """Check the shape of every row of local preference datasets, before anything heavy is imported.

    Reading a JSONL file costs milliseconds and spares the user the ~10 s of library imports and model
    loading that would come before the same error otherwise. Hub datasets are checked when they are built.
    """
    from pathlib import Path

    from finetune.data.sources import resolve_dataset_path

    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split)):
            if Path(resolve_dataset_path(spec)).suffix in (".jsonl", ".json"):
                load_checked_rows(spec, f"data.{split}[{i}]")


def build_preference_data(data: DataSection, kind: str, log):
    """Train and eval datasets for a preference method, and the audit records (rows read per dataset).

    Token counts come later, from TRL's own tokenisation (finetune.train.preference.check_prepared).
    """
    train_ds, audits = build_preference_split(data.train, "data.train", kind)
    eval_ds, eval_audits = build_preference_split(data.eval, "data.eval", kind) if data.eval else (None, [])
    records = []
    for a in audits + eval_audits:
        records.append({"dataset": a.name, "rows": a.rows, "kept": a.kept})
        log(f"data {a.name}: {a.kept}/{a.rows} rows")
    return train_ds, eval_ds, records


def build_preference_split(specs: list[DatasetSpec], key: str, kind: str):
    """Rows for TRL's DPO/ORPO (prompt/chosen/rejected) or KTO (prompt/completion/label) trainer, with audits."""
    import datasets

    rows: list[dict[str, Any]] = []
    origins: list[Row] = []
    audits = []
    for i, spec in enumerate(specs):
        audit = Audit(name=f"{key}[{i}] {spec.path}")
        checked = load_checked_rows(spec, f"{key}[{i}]")
        audit.rows = audit.kept = len(checked)
        if kind == "kto" and spec.format == "preference":
            rows += unpair(checked)
            origins += [row for row in checked for _ in range(2)]
        else:
            keys = PAIR_KEYS if spec.format == "preference" else UNPAIRED_KEYS
            rows += [{k: row.data[k] for k in keys} for row in checked]
            origins += checked
        audits.append(audit)
    _check_one_style(rows, origins, key)
    return datasets.Dataset.from_list(rows), audits


def unpair(rows: list[Row]) -> list[dict[str, Any]]:
    """Split each pair into a desirable and an undesirable answer, for KTO.

    KTO estimates its KL term by pairing each row with the answer of its neighbour in the batch, so a
    chosen answer must not sit next to the rejected answer of the same prompt: the rejected answers are
    rotated by half the dataset before interleaving. (TRL's own unpairing puts all chosen rows first,
    which with KTO's sequential sampler gives batches of one label only.)
    """
    half = len(rows) // 2
    rotated = rows[half:] + rows[:half]
    out = []
    for good, bad in zip(rows, rotated, strict=True):
        out.append({"prompt": good.data["prompt"], "completion": good.data["chosen"], "label": True})
        out.append({"prompt": bad.data["prompt"], "completion": bad.data["rejected"], "label": False})
    return out


def _check_one_style(rows: list[dict[str, Any]], origins: list[Row], key: str) -> None:
    # TRL decides "conversational or plain text" from the first row and applies it to all of them.
    styles: dict[bool, str] = {}
    for row, origin in zip(rows, origins, strict=True):
        styles.setdefault(isinstance(row["prompt"], list), origin.where)
    if len(styles) > 1:
        raise UserError(
            f"{key}: mixes conversational rows (lists of messages) and plain-text rows; TRL treats a whole "
            "split as one or the other. Convert one kind",
            problems=[f"first conversational row: {styles[True]}", f"first plain-text row: {styles[False]}"],
        )


def label_counts(dataset) -> tuple[int, int]:
    """(desirable, undesirable) rows of a KTO dataset."""
    labels = dataset["label"]
    good = sum(bool(label) for label in labels)
    return good, len(labels) - good


def kto_label_warning(dataset) -> str | None:
    """A warning when a KTO dataset has only one kind of label.

    (TRL warns about unbalanced counts itself, with the desirable_weight/undesirable_weight range to use;
    with one kind missing its counts are clamped to 1 and it says nothing.)
    """
    good, bad = label_counts(dataset)
    if good and bad:
        return None
    which = "undesirable (label: false)" if good else "desirable (label: true)"
    return f"data.train has no {which} rows; KTO learns from both kinds"
