"""Show prepared rows as the model sees them: trained tokens one way, masked tokens another.

In a terminal, trained text is bold green and masked text dim; when the output is piped (or colour
is off), trained text is wrapped in [[ ]] so the difference survives copy, paste and grep.
"""

from __future__ import annotations

import itertools
from typing import Any

from finetune.data.pipeline import Audit

OPEN, CLOSE = "[[", "]]"
TRAINED_STYLE, MASKED_STYLE = "bold green", "dim"


def token_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The row's text cut into runs of trained / masked tokens, in order."""
    runs = itertools.groupby(zip(input_ids, labels, strict=True), key=lambda pair: pair[1] != -100)
    return [
        (
            tokenizer.decode(
                [token for token, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False
            ),
            trained,
        )
        for trained, run in runs
    ]


def preference_segments(tokenizer, row: dict[str, Any]) -> dict[str, list[tuple[str, bool]]]:
    """Prompt (masked) + chosen / rejected (trained), rendered as TRL will render them."""
    prompt = row["prompt"]
    out = {}
    for answer in ("chosen", "rejected"):
        if isinstance(prompt, str):
            out[answer] = [(prompt, False), (row[answer] + (tokenizer.eos_token or ""), True)]
            continue
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(prompt + row[answer], tokenize=False)
        split = len(head) if whole.startswith(head) else len(tokenizer.apply_chat_template(prompt, tokenize=False))
        out[answer] = [(whole[:split], False), (whole[split:], True)]
    return out


def example_records(dataset, tokenizer, count: int, preference: bool) -> list[dict[str, Any]]:
    """The first `count` rows, as JSON-ready records with their segments."""
    records = []
    for index in range(min(count, len(dataset))):
        row = dataset[index]
        record: dict[str, Any] = {"index": index, "source": row["source"]}
        if preference:
            record["segments"] = {
                k: [{"text": t, "trained": m} for t, m in v] for k, v in preference_segments(tokenizer, row).items()
            }
        else:
            record["tokens"] = len(row["input_ids"])
            record["trained_tokens"] = sum(label != -100 for label in row["labels"])
            record["segments"] = [
                {"text": t, "trained": m} for t, m in token_segments(tokenizer, row["input_ids"], row["labels"])
            ]
            record["input_ids"], record["labels"] = row["input_ids"], row["labels"]
        records.append(record)
    return records


def render_segments(segments: list[dict[str, Any]], colour: bool):
    """A rich Text (colour) or a plain string with [[trained]] markers."""
    from rich.text import Text

    if colour:
        text = Text()
        for segment in segments:
            text.append(segment["text"], style=TRAINED_STYLE if segment["trained"] else MASKED_STYLE)
        return text
    return "".join(f"{OPEN}{s['text']}{CLOSE}" if s["trained"] else s["text"] for s in segments)


def print_examples(console, records: list[dict[str, Any]], total: int, colour: bool) -> None:
    """Each example under a header naming its source and token counts."""
    legend = (
        f"[{TRAINED_STYLE}]trained tokens[/] / [{MASKED_STYLE}]masked tokens (no loss)[/]"
        if colour
        else f"trained tokens are inside {OPEN} {CLOSE}; everything else is masked (no loss)"
    )
    console.print(legend, markup=colour, highlight=False)
    for record in records:
        counts = f" · {record['trained_tokens']}/{record['tokens']} tokens trained" if "tokens" in record else ""
        header = f"example {record['index'] + 1} of {total} · {record['source']}{counts}"
        if colour:
            console.rule(header, style="cyan")
        else:
            console.print(f"--- {header} ---", markup=False, highlight=False, soft_wrap=True)
        parts = record["segments"]
        for name, segments in parts.items() if isinstance(parts, dict) else [("", parts)]:
            if name:
                console.print(f"{name}:", markup=False, highlight=False)
            console.print(render_segments(segments, colour), markup=False, highlight=False, soft_wrap=True)


def audit_table(audits: list[Audit]):
    """The label audit as a rich table: one row per dataset."""
    from rich.table import Table

    table = Table(title="label audit", title_justify="left")
    for name in ("dataset", "rows", "kept", "dropped", "truncated", "tokens", "trained", "lengths p50/p95/max",
                 "end of turn"):
        table.add_column(name, justify="left" if name == "dataset" else "right")
    for audit in audits:
        trained = f"{audit.trained_tokens} ({audit.trained_fraction:.1%})" if audit.tokens else "-"
        table.add_row(
            audit.name,
            str(audit.rows),
            str(audit.kept) + (f" ({audit.held_out} to eval)" if audit.held_out else ""),
            str(audit.dropped_rows),
            str(audit.truncated) + (f" (+{audit.split_rows} split)" if audit.split_rows else ""),
            str(audit.tokens) if audit.tokens else "-",
            trained,
            f"{audit.length_p50}/{audit.length_p95}/{audit.length_max}" if audit.tokens else "-",
            _end_of_turn(audit),
        )
    return table


def _end_of_turn(audit: Audit) -> str:
    """What closes the trained turns; a template that writes nothing trains no stop token, which is said."""
    shown = ", ".join(audit.end_of_turn) or "-"
    if audit.rows_without_end_of_turn:
        none = f"none in {audit.rows_without_end_of_turn} rows (no stop token)"
        return none if shown == "-" else f"{shown}; {none}"
    return shown


def dropped_lines(audits: list[Audit]) -> list[str]:
    """Why rows were dropped, with the first few row numbers."""
    return [
        f"{audit.name}: {entry['count']} dropped: {reason} (first: {', '.join(entry['first'])})"
        for audit in audits
        for reason, entry in audit.dropped.items()
    ]
