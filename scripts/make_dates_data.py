"""Write the date-normalisation task shipped in finetune/resources/data/ (dates_train.jsonl, dates_eval.jsonl).

Each row asks for a date written one of eight ways ("March 3rd, 2021", "3/3/21", "the third of March
2021", "Wednesday, March 3, 2021", ...) in ISO form, and the assistant answers with the ISO date alone
("2021-03-03"). Rows are chat `messages` without a system turn, so a stock template adds its own
default system prompt. Every date appears in one row only, so the eval split shares no date with the
training split. Deterministic (seeded): running it twice gives byte-identical files.
Usage: ``python scripts/make_dates_data.py [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "finetune" / "resources" / "data"
SEED = 2021
TRAIN_ROWS, EVAL_ROWS = 600, 80
FIRST, LAST = dt.date(1950, 1, 1), dt.date(2035, 12, 31)

ORDINALS = [
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
    "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
    "twentieth", "twenty-first", "twenty-second", "twenty-third", "twenty-fourth", "twenty-fifth", "twenty-sixth",
    "twenty-seventh", "twenty-eighth", "twenty-ninth", "thirtieth", "thirty-first",
]  # fmt: skip
# Spelled out rather than strftime's %B/%A, which follow the locale.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
INSTRUCTIONS = (
    "Convert this date to YYYY-MM-DD: {date}",
    "Normalise the date to ISO format (YYYY-MM-DD): {date}",
    "Rewrite the date as YYYY-MM-DD. Reply with the date only.\n{date}",
    "What is {date} in YYYY-MM-DD format?",
)


def suffix(day: int) -> str:
    """English ordinal suffix: 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    if 11 <= day % 100 <= 13:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def month(date: dt.date) -> str:
    """The month's English name."""
    return MONTHS[date.month - 1]


def abbreviated_month(date: dt.date) -> str:
    """Mar, Sept., Jan, ... (with or without a full stop, chosen from the date so the output is stable)."""
    short = "Sept" if date.month == 9 else MONTHS[date.month - 1][:3]
    return short + ("." if date.day % 2 else "")


# Ways to write a date; the slash forms are month/day/year, two-digit years only for 2000-2035.
FORMATS = {
    "month_day_year": lambda d: f"{month(d)} {d.day}, {d.year}",
    "month_ordinal_year": lambda d: f"{month(d)} {d.day}{suffix(d.day)}, {d.year}",
    "day_month_year": lambda d: f"{d.day} {month(d)} {d.year}",
    "abbreviated": lambda d: f"{abbreviated_month(d)} {d.day} {d.year}",
    "ordinal_words": lambda d: f"the {ORDINALS[d.day - 1]} of {month(d)} {d.year}",
    "slashes": lambda d: f"{d.month}/{d.day}/{d.year}",
    "slashes_short_year": lambda d: f"{d.month}/{d.day}/{d.year % 100:02d}",
    "weekday": lambda d: f"{WEEKDAYS[d.weekday()]}, {month(d)} {d.day}, {d.year}",
}


def row(date: dt.date, form: str, instruction: str) -> dict:
    """One chat row: the question and the ISO date as the whole answer."""
    question = instruction.format(date=FORMATS[form](date))
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": date.isoformat()}]}


def make_rows(rng: random.Random, dates: list[dt.date]) -> list[dict]:
    """A row per date, in a format and with an instruction drawn at random."""
    rows = []
    for date in dates:
        forms = list(FORMATS) if date.year >= 2000 else [f for f in FORMATS if f != "slashes_short_year"]
        rows.append(row(date, rng.choice(forms), rng.choice(INSTRUCTIONS)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rng = random.Random(SEED)
    span = (LAST - FIRST).days
    days = rng.sample(range(span + 1), TRAIN_ROWS + EVAL_ROWS)  # distinct dates: no date in both splits
    dates = [FIRST + dt.timedelta(days=n) for n in days]
    splits = {"dates_train.jsonl": dates[:TRAIN_ROWS], "dates_eval.jsonl": dates[TRAIN_ROWS:]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, split_dates in splits.items():
        lines = [json.dumps(r, ensure_ascii=False) for r in make_rows(rng, split_dates)]
        (args.out_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} rows to {args.out_dir / name}")


if __name__ == "__main__":
    main()
