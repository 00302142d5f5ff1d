"""The batched functions `datasets.map` runs over raw rows: parse, check, encode with loss masks.

They run in worker processes (`num_proc`), so they take everything as arguments and never raise
for a bad row: a row that does not fit becomes an output row with `bad` (the reason) and `detail`
set, and the main process decides whether that is an error or a skipped row.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.data.formats import BadRow, to_canonical
from finetune.data.sources import JSON_TEXT, WHERE, parse_json_row
from finetune.errors import UserError
from finetune.recipe.schema import DatasetSpec

STATS = ("source", "n_tokens", "n_trained", "truncated", "chunk", "end_of_turn", "bad", "detail")
# The reason of rows the chat template cannot train exactly: always an error, also with on_bad_row: skip
# (skipping them would quietly train on another distribution; the message says how to fix the recipe).
NOT_EXACT = "chat template cannot train it exactly"


def sft_features():
    """Arrow types of the SFT map's output (fixed, so datasets with only bad rows still concatenate)."""
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    return datasets.Features(
        {
            "input_ids": ints,
            "labels": ints,
            "source": datasets.Value("string"),
            "n_tokens": datasets.Value("int32"),
            "n_trained": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "chunk": datasets.Value("int32"),
            "end_of_turn": datasets.Value("string"),  # what closes the trained turns; "" none; null: n/a
            "bad": datasets.Value("string"),
            "detail": datasets.Value("string"),
        }
    )


def preference_features():
    """Arrow types of the preference map's output: prompt/chosen/rejected as JSON text."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {"prompt": text, "chosen": text, "rejected": text, "source": text, "bad": text, "detail": text}
    )


def raw_rows(batch: dict[str, list], indices: list[int], label: str):
    """(where, row) pairs of a batch; a row that is not valid JSON comes back as a BadRow."""
    if JSON_TEXT in batch:
        for where, text in zip(batch[WHERE], batch[JSON_TEXT], strict=True):
            try:
                yield where, parse_json_row(text)
            except BadRow as bad:
                yield where, bad
        return
    names = list(batch)
    for position, index in enumerate(indices):
        yield f"{label} row {index + 1}", {name: batch[name][position] for name in names}


def encode_sft_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    spec: DatasetSpec,
    label: str,
    tokenizer,
    template: str | None,
    train_on: str,
    max_length: int,
    date: str | None = None,
) -> dict[str, list]:
    """Encode a batch of raw rows into input_ids/labels (-100 = no loss) and per-row statistics.

    `date` is the day a chat template that prints one shows (data.template_date, or the day of preparation).
    """
    from finetune.data.masks import NotExact

    out: dict[str, list] = {name: [] for name in ("input_ids", "labels", *STATS)}
    for where, raw in raw_rows(batch, indices, label):
        try:
            if isinstance(raw, BadRow):
                raise raw
            encoded = encode_row(to_canonical(raw, spec), spec.format, tokenizer, template, train_on, date)
        except BadRow as bad:
            _add(out, [], [], where, bad=bad.reason, detail=bad.detail)
            continue
        except NotExact as exc:
            _add(out, [], [], where, bad=NOT_EXACT, detail=exc.render())
            continue
        except UserError as exc:  # the template or the mask could not handle this row
            _add(out, [], [], where, bad="cannot be encoded", detail=exc.render())
            continue
        ids, labels, closing = encoded.input_ids, encoded.labels, encoded.end_of_turn
        if spec.format == "text":  # continued pretraining: split long texts, lose nothing
            for chunk, start in enumerate(range(0, len(ids), max_length)):
                piece = labels[start : start + max_length]
                _add(out, ids[start : start + max_length], piece, where, len(ids), chunk=chunk)
            continue
        truncated = len(ids) > max_length
        _add(out, ids[:max_length], labels[:max_length], where, len(ids), truncated, end_of_turn=closing)
    return out


def _add(out, ids, labels, where, n_tokens=0, truncated=False, chunk=0, end_of_turn=None, bad="", detail="") -> None:
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["source"].append(where)
    out["n_tokens"].append(n_tokens)
    out["n_trained"].append(len(labels) - labels.count(-100))
    out["truncated"].append(truncated)
    out["chunk"].append(chunk)
    out["end_of_turn"].append(end_of_turn)
    out["bad"].append(bad)
    out["detail"].append(detail)


def encode_row(row: dict[str, Any], fmt: str, tokenizer, template: str | None, train_on: str,
               date: str | None = None):
    """The `Encoded` row (ids, labels, end_of_turn) of one canonical row (see formats.py)."""
    from finetune.data.masks import Encoded, encode_messages, encode_prompt_completion

    tools = row.get("tools")
    if "messages" in row:
        mode = "all_assistant" if train_on == "all" else train_on
        encoded = encode_messages(tokenizer, row["messages"], chat_template=template, train_on=mode, tools=tools,
                                  date=date)
    elif fmt == "text":
        encoded = encode_prompt_completion(tokenizer, "", row["text"], chat_template=None)
        encoded.end_of_turn = None  # continued pretraining has no turns
    else:
        encoded = encode_prompt_completion(tokenizer, row["prompt"], row["completion"], chat_template=template,
                                           date=date)
    ids = list(encoded.input_ids)
    labels = list(ids) if train_on == "all" else list(encoded.labels)
    return Encoded(ids, labels, encoded.end_of_turn)


def check_preference_batch(
    batch: dict[str, list], indices: list[int], *, spec: DatasetSpec, label: str
) -> dict[str, list]:
    """Check preference rows; TRL's DPOTrainer tokenises them itself."""
    out: dict[str, list] = {name: [] for name in ("prompt", "chosen", "rejected", "source", "bad", "detail")}
    for where, raw in raw_rows(batch, indices, label):
        try:
            if isinstance(raw, BadRow):
                raise raw
            row = to_canonical(raw, spec)
            values = [json.dumps(row[k], ensure_ascii=False) for k in ("prompt", "chosen", "rejected")]
            bad, detail = "", ""
        except BadRow as exc:
            values, bad, detail = ["", "", ""], exc.reason, exc.detail
        for key, value in zip(("prompt", "chosen", "rejected"), values, strict=True):
            out[key].append(value)
        out["source"].append(where)
        out["bad"].append(bad)
        out["detail"].append(detail)
    return out
