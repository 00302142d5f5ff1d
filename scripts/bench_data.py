"""Measure the data pipeline against a plain `datasets.map` + `apply_chat_template`, in one run.

Generates a chat dataset (default 100,000 rows, 1-3 exchanges, ~20% with a system prompt) as JSONL,
then times, each from a cold cache:
  pipeline        `prepare_datasets`: read with line numbers, check, encode with loss masks, audit,
                  shuffle, write the cache entry
  pipeline (warm) the same call again: a cache hit
  baseline        load_dataset("json") + map(apply_chat_template(tokenize=True)): ids only, no labels
  baseline+mask   the same with return_assistant_tokens_mask=True (needs {% generation %} markers)
for every --num-proc value given. Rows/s and tokens/s are over the rows generated.

Usage: python scripts/bench_data.py [--rows 100000] [--num-proc 1 2] [--model builtin:tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

COMMON = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two"
)
WORDS = COMMON.split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Chat rows of random words: 1-3 user/assistant exchanges, some with a system prompt."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            messages = [{"role": "system", "content": sentence(4, 10)}] if rng.random() < 0.2 else []
            for _ in range(rng.randint(1, 3)):
                messages += [
                    {"role": "user", "content": sentence(5, 25)},
                    {"role": "assistant", "content": sentence(10, 60)},
                ]
            handle.write(json.dumps({"messages": messages}) + "\n")


def time_pipeline(data: Path, model: str, num_proc: int, cache: Path) -> dict:
    import datasets  # noqa: F401 (imported before the clock starts, as the baseline's is)

    import finetune.data.cache
    from finetune.data.prepare import prepare_datasets, set_chat_template
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_tokenizer
    from finetune.recipe import recipe_from_dict

    finetune.data.cache.cache_root = lambda: cache  # a cold data cache; the model stays where it is
    recipe = recipe_from_dict({
        "model": {"path": model},
        "data": {"train": [{"path": str(data)}], "num_proc": num_proc},
        "method": {"kind": "sft"},
        "training": {"max_length": 4096},
    })  # fmt: skip
    tokenizer = load_tokenizer(resolve_model_path(model), recipe.model)
    set_chat_template(recipe, tokenizer)
    start = time.perf_counter()
    train, _, audits = prepare_datasets(recipe, tokenizer, lambda _: None)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    prepare_datasets(recipe, tokenizer, lambda _: None)
    warm = time.perf_counter() - start
    return {"seconds": cold, "warm_seconds": warm, "tokens": audits[0].tokens, "rows": len(train)}


def time_baseline(data: Path, model: str, num_proc: int, cache: Path, masks: bool) -> dict:
    import datasets

    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_tokenizer
    from finetune.recipe.schema import ModelSection

    tokenizer = load_tokenizer(resolve_model_path(model), ModelSection(path=model))

    def encode(batch):
        out = tokenizer.apply_chat_template(
            batch["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=masks
        )
        return {key: out[key] for key in ("input_ids", "assistant_masks") if key in out}

    start = time.perf_counter()
    table = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    table = table.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None,
                      remove_columns=table.column_names)  # fmt: skip
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in table["input_ids"])
    return {"seconds": seconds, "tokens": tokens, "rows": len(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="builtin:tiny-llama")
    args = parser.parse_args()
    from finetune.logs import quiet_libraries

    quiet_libraries()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = Path(tmp) / "chat.jsonl"
        generate(data, args.rows)
        print(f"generated {args.rows:,} rows ({data.stat().st_size / 1e6:.1f} MB) in {data}")
        for n in args.num_proc:
            runs = {
                "pipeline": time_pipeline(data, args.model, n, Path(tmp) / f"cache-{n}"),
                "baseline": time_baseline(data, args.model, n, Path(tmp) / f"hf-{n}", masks=False),
                "baseline+mask": time_baseline(data, args.model, n, Path(tmp) / f"hf-mask-{n}", masks=True),
            }
            for name, run in runs.items():
                results.append({"what": name, "num_proc": n, **run})
                if "warm_seconds" in run:
                    results.append({"what": "pipeline (cache hit)", "num_proc": n, "seconds": run["warm_seconds"],
                                    "tokens": run["tokens"], "rows": run["rows"]})  # fmt: skip
    print("\n| what | num_proc | seconds | rows/s | tokens/s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['what']} | {r['num_proc']} | {r['seconds']:.2f} | {r['rows'] / r['seconds']:,.0f} "
              f"| {r['tokens'] / r['seconds']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
