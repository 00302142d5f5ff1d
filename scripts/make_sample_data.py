"""Write the sample data sets shipped in finetune/resources/data/.

Deterministic (seeded, no network): running it twice gives byte-identical files. The content is a
handful of fixed question templates with short answers, so a ~1M-parameter model learns it in a
few hundred steps. Usage: ``python scripts/make_sample_data.py [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "finetune" / "resources" / "data"
SEED = 1234

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow",
    "Greece": "Athens", "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm",
    "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna", "Peru": "Lima",
    "Kenya": "Nairobi", "Cuba": "Havana", "Chile": "Santiago",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow",
    "happy": "sad", "open": "closed", "light": "dark", "wet": "dry", "full": "empty",
    "early": "late", "left": "right", "high": "low", "hard": "soft", "loud": "quiet",
}  # fmt: skip
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a tomato": "red", "a carrot": "orange", "milk": "white", "a lemon": "yellow", "a frog": "green",
    "blood": "red", "a crow": "black",
}  # fmt: skip
WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "bus", "star", "fish", "bird",
         "frog", "tree", "book", "milk"]  # fmt: skip
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "Answer the question briefly.",
]
ALL_COLOURS = sorted(set(COLOURS.values()))
# Addition pairs kept out of every training file, so the eval set tests generalisation.
HELD_OUT_SUMS = [(a, b) for a in range(1, 10) for b in range(1, 10) if (7 * a + b) % 9 == 0]
TRAIN_SUMS = [(a, b) for a in range(1, 10) for b in range(1, 10) if (a, b) not in HELD_OUT_SUMS]

QA = tuple[str, str, str]  # question, right answer, plausible wrong answer


def capital_qa(rng: random.Random, country: str | None = None) -> QA:
    """A capital-city question, its answer and a wrong answer."""
    country = country or rng.choice(sorted(CAPITALS))
    wrong = rng.choice([c for k, c in sorted(CAPITALS.items()) if k != country])
    answer = f"The capital of {country} is {{}}."
    return f"What is the capital of {country}?", answer.format(CAPITALS[country]), answer.format(wrong)


def addition_qa(rng: random.Random, pairs: list[tuple[int, int]] = TRAIN_SUMS) -> QA:
    """A one-digit addition question."""
    a, b = rng.choice(pairs)
    wrong = a + b + rng.choice([-2, -1, 1, 2])
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."


def opposite_qa(rng: random.Random) -> QA:
    """An opposite-word question."""
    word = rng.choice(sorted(OPPOSITES))
    wrong = rng.choice([w for k, w in sorted(OPPOSITES.items()) if k != word])
    answer = f"The opposite of {word} is {{}}."
    return f"What is the opposite of {word}?", answer.format(OPPOSITES[word]), answer.format(wrong)


def colour_qa(rng: random.Random) -> QA:
    """A what-colour-is-it question."""
    thing = rng.choice(sorted(COLOURS))
    wrong = rng.choice([c for c in ALL_COLOURS if c != COLOURS[thing]])
    answer = thing[0].upper() + thing[1:] + " is {}."
    return f"What colour is {thing}?", answer.format(COLOURS[thing]), answer.format(wrong)


def backwards_qa(rng: random.Random) -> QA:
    """A spell-it-backwards question; the wrong answer is the word itself."""
    word = rng.choice(WORDS)
    answer = f"{word} backwards is {{}}."
    return f"Spell the word {word} backwards.", answer.format(word[::-1]), answer.format(word)


TASKS: list[Callable[[random.Random], QA]] = [capital_qa, addition_qa, opposite_qa, colour_qa, backwards_qa]


def random_qa(rng: random.Random) -> QA:
    """A question from any template, chosen uniformly."""
    return rng.choice(TASKS)(rng)


def chat_row(rng: random.Random, first: QA | None = None, ask: Callable = random_qa) -> dict:
    """One `messages` row: ~20% with a system message, ~25% with two exchanges."""
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = [first or ask(rng)]
    if rng.random() < 0.25:
        turns.append(ask(rng))
    for question, answer, _ in turns:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def make_chat(rng: random.Random, n: int = 300, n_france: int = 10) -> list[dict]:
    """Chat rows; the quickstart question opens `n_france` of them so the model surely learns it."""
    rows = [chat_row(rng, capital_qa(rng, "France")) for _ in range(n_france)]
    rows += [chat_row(rng) for _ in range(n - n_france)]
    rng.shuffle(rows)
    return rows


def make_prompt_completion(rng: random.Random, n: int = 200) -> list[dict]:
    """Plain-text prompt/completion rows."""
    rows = []
    for _ in range(n):
        question, answer, _ = random_qa(rng)
        rows.append({"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"})
    return rows


def make_preference(rng: random.Random, n: int = 200) -> list[dict]:
    """Conversational preference pairs (TRL format): the right answer is chosen."""
    rows = []
    for _ in range(n):
        question, answer, wrong = random_qa(rng)
        rows.append({
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": wrong}],
        })  # fmt: skip
    return rows


def make_unpaired_preference(rng: random.Random, n: int = 200) -> list[dict]:
    """Unpaired preference rows (TRL's KTO format): one answer per prompt, labelled good or bad, about half each."""
    rows = []
    for _ in range(n):
        question, answer, wrong = random_qa(rng)
        good = rng.random() < 0.5
        rows.append({
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer if good else wrong}],
            "label": good,
        })  # fmt: skip
    return rows


def make_eval(rng: random.Random, train: list[dict], n: int = 30) -> list[dict]:
    """Held-out chat rows: no row equals a training row; additions use only held-out pairs."""
    seen = {json.dumps(row, sort_keys=True) for row in train}

    def ask(r: random.Random) -> QA:
        task = r.choice(TASKS)
        return addition_qa(r, HELD_OUT_SUMS) if task is addition_qa else task(r)

    rows: list[dict] = []
    while len(rows) < n:
        row = chat_row(rng, ask=ask)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def make_sharegpt(rng: random.Random, n: int = 120) -> list[dict]:
    """ShareGPT rows: {"conversations": [{"from": "human"|"gpt", "value": ...}]}, some with a system field."""
    rows = []
    for _ in range(n):
        chat = chat_row(rng)["messages"]
        who = {"user": "human", "assistant": "gpt"}
        row: dict = {}
        if chat[0]["role"] == "system":
            row["system"] = chat.pop(0)["content"]
        row["conversations"] = [{"from": who[m["role"]], "value": m["content"]} for m in chat]
        rows.append(row)
    return rows


ALPACA_INSTRUCTIONS = ["Answer the question.", "Answer in one sentence.", "Reply briefly."]


def make_alpaca(rng: random.Random, n: int = 120) -> list[dict]:
    """Alpaca rows: the question is the instruction, or the input under a generic instruction."""
    rows = []
    for _ in range(n):
        question, answer, _ = random_qa(rng)
        if rng.random() < 0.5:
            rows.append({"instruction": question, "input": "", "output": answer})
        else:
            rows.append({"instruction": rng.choice(ALPACA_INSTRUCTIONS), "input": question, "output": answer})
    return rows


def make_text(rng: random.Random, n: int = 60) -> list[str]:
    """Paragraphs of plain prose stating the sample facts, for continued pretraining."""
    paragraphs = []
    for _ in range(n):
        facts = [random_qa(rng)[1] for _ in range(rng.randint(2, 4))]
        lines = [" ".join(facts[: len(facts) // 2 or 1]), " ".join(facts[len(facts) // 2 or 1 :])]
        paragraphs.append("\n".join(line for line in lines if line))
    return paragraphs


def make_qa_csv(rng: random.Random, n: int = 80) -> list[dict]:
    """question/answer rows with their own column names (mapped to alpaca with `columns:`)."""
    return [dict(zip(("question", "answer"), random_qa(rng)[:2], strict=True)) for _ in range(n)]


TOOLS = [
    {"type": "function", "function": {
        "name": "capital", "description": "The capital city of a country.",
        "parameters": {"type": "object", "properties": {"country": {"type": "string", "description": "A country"}},
                       "required": ["country"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "The sum of two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "First"},
                                                        "b": {"type": "integer", "description": "Second"}},
                       "required": ["a", "b"]}}},
]  # fmt: skip


def make_tool_calls(rng: random.Random, n: int = 120) -> list[dict]:
    """Tool-calling chats in the OpenAI format: the assistant calls a tool (no text), the tool answers, the
    assistant replies. `tools` lists the schemas the chat template shows the model (recipes/tiny/sft_tool_calls.yaml);
    templates with tool calls (qwen2.5, qwen3) write each call inside <tool_call> ... </tool_call>, the tokens
    recipes/tiny/sft_new_tokens.yaml adds."""
    rows = []
    for i in range(n):
        call_id = f"call{i:05d}"  # nine characters, as Mistral's templates require
        if rng.random() < 0.5:
            country = rng.choice(sorted(CAPITALS))
            question, name, arguments = f"Look up the capital of {country}.", "capital", {"country": country}
            result, answer = CAPITALS[country], f"The capital of {country} is {CAPITALS[country]}."
        else:
            a, b = rng.choice(TRAIN_SUMS)
            question, name, arguments = f"Use the calculator: what is {a} plus {b}?", "add", {"a": a, "b": b}
            result, answer = str(a + b), f"{a} plus {b} is {a + b}."
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        rows.append({"tools": TOOLS, "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "name": name, "content": result},
            {"role": "assistant", "content": answer},
        ]})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one compact JSON object per line."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(rows)} rows, {path.stat().st_size} bytes)")


def write_json(path: Path, rows: list[dict]) -> None:
    """Write a JSON list, one row per line (readable, and diffs stay small)."""
    text = "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n]\n"
    path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {path} ({len(rows)} rows, {path.stat().st_size} bytes)")


def write_text(path: Path, paragraphs: list[str]) -> None:
    """Write paragraphs separated by blank lines."""
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8", newline="\n")
    print(f"wrote {path} ({len(paragraphs)} paragraphs, {path.stat().st_size} bytes)")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write a CSV file with a header row."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows, {path.stat().st_size} bytes)")


def main() -> None:
    """Generate all sample files into the output directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out_dir
    out.mkdir(parents=True, exist_ok=True)
    # One generator per file, so changing one file's recipe leaves the others byte-identical.
    chat = make_chat(random.Random(SEED))
    write_jsonl(out / "sample_chat.jsonl", chat)
    write_jsonl(out / "sample_prompt_completion.jsonl", make_prompt_completion(random.Random(SEED + 1)))
    write_jsonl(out / "sample_preference.jsonl", make_preference(random.Random(SEED + 2)))
    write_jsonl(out / "sample_eval_chat.jsonl", make_eval(random.Random(SEED + 3), chat))
    write_jsonl(out / "sample_unpaired_preference.jsonl", make_unpaired_preference(random.Random(SEED + 4)))
    write_jsonl(out / "sample_sharegpt.jsonl", make_sharegpt(random.Random(SEED + 4)))
    write_json(out / "sample_alpaca.json", make_alpaca(random.Random(SEED + 5)))
    write_text(out / "sample_text.txt", make_text(random.Random(SEED + 6)))
    write_csv(out / "sample_qa.csv", make_qa_csv(random.Random(SEED + 7)))
    write_jsonl(out / "sample_tool_calls.jsonl", make_tool_calls(random.Random(SEED + 4)))


if __name__ == "__main__":
    main()
