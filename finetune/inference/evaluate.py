"""`finetune eval`: loss and perplexity, task metrics from generations, and a before/after table.

Loss uses the training data pipeline (same template, same assistant-only labels), so eval loss here
is comparable with the eval loss logged during training. Task metrics come from greedy generations
on prompt/answer rows: exact match, contains, and JSON validity where the answer is JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.inference.load import BASE, Loaded, Sampling, generate_texts, prompt_text

METRICS = ("loss", "perplexity", "exact_match", "contains", "json_valid")


@dataclass
class Task:
    """One prompt with its reference answer."""

    prompt: str | list
    answer: str
    expects_json: bool
    where: str


def data_spec(path: str):
    """A DatasetSpec for a loss file, its format read from the first row."""
    from finetune.recipe.schema import DatasetSpec

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--data: no such file: {path}")
    first = next((line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise UserError(f"--data: {path}:1 is not JSON (expected JSONL rows)") from None
    if "messages" in row:
        return DatasetSpec(path=path, format="messages")
    if "prompt" in row and "completion" in row:
        return DatasetSpec(path=path, format="prompt_completion")
    raise UserError(f"--data: {path}:1 has neither 'messages' nor 'prompt'+'completion' (found {sorted(row)})")


def read_tasks(path: Path, max_rows: int | None = None) -> list[Task]:
    """Rows {"prompt", "answer", optional "json": true}, or chat rows whose last assistant turn is the answer."""
    from finetune.recipe.schema import DatasetSpec

    if not path.is_file():
        raise UserError(f"--tasks: no such file: {path}")
    from finetune.data.sources import read_rows

    tasks, bad = [], []
    for row in read_rows(DatasetSpec(path=str(path), max_rows=max_rows)):
        task = task_from_row(row.data, row.where)
        if task is None:
            bad.append(f"{row.where}: needs 'prompt' and 'answer' strings, or 'messages' ending with an assistant turn")
        else:
            tasks.append(task)
    if bad:
        raise UserError(f"--tasks: {len(bad)} rows have the wrong shape", problems=bad[:5])
    return tasks


def task_from_row(data: dict, where: str) -> Task | None:
    """A Task from a prompt/answer row or a messages row; None if the row has neither shape."""
    messages = data.get("messages")
    if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
        answer = messages[-1].get("content", "")
        return Task(messages[:-1], answer, bool(data.get("json")) or _is_json_value(answer), where)
    prompt, answer = data.get("prompt"), data.get("answer")
    if isinstance(prompt, (str, list)) and isinstance(answer, str):
        return Task(prompt, answer, bool(data.get("json")) or _is_json_value(answer), where)
    return None


def _is_json_value(text: str) -> bool:
    text = text.strip()
    if not text.startswith(("{", "[")):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def normalise(text: str) -> str:
    """Casefolded, whitespace collapsed, trailing punctuation dropped: "Paris." matches "paris"."""
    return re.sub(r"\s+", " ", text).strip().casefold().rstrip(".!?;, ")


def parses_as_json(text: str) -> bool:
    """Whether a generation is valid JSON (a ```json fence around it is allowed)."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def task_metrics(tasks: list[Task], outputs: list[str]) -> dict[str, float]:
    """Exact match and contains over all tasks; JSON validity over the tasks that expect JSON."""
    pairs = list(zip(tasks, outputs, strict=True))
    metrics = {
        "exact_match": sum(normalise(o) == normalise(t.answer) for t, o in pairs) / len(pairs),
        "contains": sum(normalise(t.answer) in normalise(o) for t, o in pairs) / len(pairs),
    }
    json_tasks = [(t, o) for t, o in pairs if t.expects_json]
    if json_tasks:
        metrics["json_valid"] = sum(parses_as_json(o) for _, o in json_tasks) / len(json_tasks)
    return metrics


def mean_loss(loaded: Loaded, dataset, batch_size: int = 8) -> tuple[float, int]:
    """Mean cross-entropy per trained token (labels != -100) and the number of such tokens."""
    import torch

    pad = loaded.tokenizer.pad_token_id
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        width = max(len(ids) for ids in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), width), pad)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (row_ids, row_labels) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        with torch.no_grad():
            logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits.float()
        logits = logits[:, -ids.shape[1] :]  # prompt tuning returns logits for its virtual tokens first
        shifted = labels[:, 1:].to(loaded.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        tokens += int((shifted != -100).sum())
    return total / max(tokens, 1), tokens


def evaluate_one(loaded: Loaded, name: str, dataset, tasks: list[Task], sampling: Sampling, batch_size: int) -> dict:
    """Every metric for one model (`name`: an adapter, or BASE for the base with adapters off)."""
    results: dict[str, float] = {}
    with loaded.use(name):
        if dataset is not None and len(dataset):
            loss, _ = mean_loss(loaded, dataset, batch_size)
            results.update(loss=loss, perplexity=math.exp(min(loss, 50)))
        if tasks:
            outputs = []
            for start in range(0, len(tasks), batch_size):
                batch = tasks[start : start + batch_size]
                texts = [prompt_text(loaded.tokenizer, t.prompt) for t in batch]
                outputs += generate_texts(loaded, texts, sampling)
            results.update(task_metrics(tasks, outputs))
            shown = zip(tasks[:3], outputs[:3], strict=True)
            results["_examples"] = [{"prompt": t.prompt, "answer": t.answer, "output": o} for t, o in shown]
    return results


def loss_dataset(loaded: Loaded, specs, data_section, max_length: int):
    """Encode the loss data exactly as training does (template, masks, truncation)."""
    from finetune.data.mix import concatenate_and_shuffle
    from finetune.data.pipeline import encode_dataset
    from finetune.data.sources import resolve_sources

    template, parts = loaded.tokenizer.chat_template, []
    for i, spec in enumerate(specs):
        key = f"data.eval[{i}]"
        rows, _ = encode_dataset(
            spec,
            key,
            resolve_sources(spec, key),
            section=data_section,
            tokenizer=loaded.tokenizer,
            template=template,
            max_length=max_length,
            preference=False,
        )
        parts.append(rows.select_columns(["input_ids", "labels"]))
    return concatenate_and_shuffle(parts, None)


def render_table(results: dict[str, dict]) -> str:
    """Metrics down, models across; a change column when there are exactly two models."""
    names = list(results)
    extra = sorted({k for r in results.values() for k in r if k not in METRICS and not k.startswith("_")})
    metrics = [m for m in METRICS if any(m in r for r in results.values())] + extra
    header = ["metric", *names] + (["change"] if len(names) == 2 else [])
    rows = [header]
    for metric in metrics:
        values = [results[n].get(metric) for n in names]
        row = [metric] + [_fmt(v) for v in values]
        if len(names) == 2:
            before, after = values
            row.append("" if before is None or after is None else f"{after - before:+.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}"


def models_to_compare(loaded: Loaded, with_base: bool) -> list[str]:
    """Column order: the base first (the 'before'), then each adapter (or the model itself)."""
    if not loaded.adapters:
        return [BASE]
    return ([BASE] if with_base else []) + list(loaded.adapters)


def run_eval(
    spec: str,
    *,
    data: str | None = None,
    tasks_file: Path | None = None,
    with_base: bool = False,
    extra_adapters=(),
    max_rows: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    lm_eval_tasks: list[str] | None = None,
    log=None,
) -> dict[str, dict]:
    """Evaluate a run, model or adapter (and its base with `with_base`); return {model: {metric: value}}."""
    from finetune.inference.load import load, resolve_source
    from finetune.recipe.schema import DataSection

    if lm_eval_tasks:
        from finetune.inference.lm_eval import check_lm_eval

        check_lm_eval()
    source = resolve_source(spec)
    if data:
        specs = [data_spec(data).model_copy(update={"max_rows": max_rows})]
        section = DataSection(train=specs)
    elif source.recipe is not None and source.recipe.data.eval:
        specs = [s.model_copy(update={"max_rows": max_rows or s.max_rows}) for s in source.recipe.data.eval]
        section = source.recipe.data
    else:
        specs, section = [], None
    held_out = not data and source.recipe is not None and source.recipe.data.eval_fraction is not None
    if with_base and not source.adapters and source.original_base is None:
        raise UserError(f"--base: {spec} is a plain model; there is no base to compare it with")
    if not specs and not held_out and tasks_file is None and not lm_eval_tasks:
        where = "the run's recipe has no data.eval" if source.recipe is not None else f"{spec} is not a run"
        raise UserError(f"nothing to evaluate: {where}; pass --data FILE (loss) and/or --tasks FILE (prompt/answer)")
    max_length = source.recipe.training.max_length if source.recipe is not None else 2048
    sampling = Sampling(max_new_tokens=max_new_tokens)

    loaded = load(source, extra_adapters, log=log)
    dataset = loss_dataset(loaded, specs, section, max_length) if specs else None
    rows = _rows(specs)
    if held_out:  # the rows training held out (data.eval_fraction), found again the way training split them
        held, where = held_out_rows(loaded, source.recipe)
        dataset = held if dataset is None else _concatenate(dataset, held)
        rows += [row for row in _rows(source.recipe.data.train) if row.where in where]
        if log:
            log(f"evaluating on the {len(held)} rows training held out (data.eval_fraction)")
    if tasks_file is not None:
        tasks = read_tasks(tasks_file, max_rows)
    else:  # chat rows of the loss data double as prompt/answer tasks: the last assistant turn is the answer
        tasks = [t for row in rows if (t := task_from_row(row.data, row.where)) and row.data.get("messages")]
    results: dict[str, dict] = {}
    if source.adapters or not with_base:
        for name in models_to_compare(loaded, with_base):
            label = name if loaded.adapters else "model"
            if log:
                log(f"evaluating {label}")
            results[label] = evaluate_one(loaded, name, dataset, tasks, sampling, batch_size)
    else:  # a merged or fully trained model: load the base it started from as a second model
        from finetune.inference.load import Source

        base = load(Source(source.original_base, source.tokenizer_dir), log=log)
        for label, model in (("base", base), ("tuned", loaded)):
            if log:
                log(f"evaluating {label}")
            results[label] = evaluate_one(model, BASE, dataset, tasks, sampling, batch_size)
    if lm_eval_tasks:
        from finetune.inference.lm_eval import run_lm_eval

        for label in results:
            name = label if label in loaded.adapters else BASE
            model = loaded if label != "base" or source.adapters else base
            results[label].update(run_lm_eval(model, name, lm_eval_tasks, max_rows, batch_size))
    return results


def held_out_rows(loaded: Loaded, recipe):
    """The training rows held out for eval by data.eval_fraction, encoded as training encoded them, and where they are.

    Training holds out a seeded random share of each train dataset's rows (data.mix.hold_out); encoding the same
    data with the same recipe and seed picks the same rows again.
    """
    from finetune.data.mix import concatenate_and_shuffle, hold_out
    from finetune.data.pipeline import encode_dataset
    from finetune.data.sources import resolve_sources

    parts = []
    for i, spec in enumerate(recipe.data.train):
        key = f"data.train[{i}]"
        rows, _ = encode_dataset(spec, key, resolve_sources(spec, key), section=recipe.data, tokenizer=loaded.tokenizer,
                                 template=loaded.tokenizer.chat_template, max_length=recipe.training.max_length,
                                 preference=False)
        parts.append(hold_out(rows, recipe.data.eval_fraction, recipe.training.seed, i)[1])
    held = concatenate_and_shuffle(parts, None)
    return held.select_columns(["input_ids", "labels"]), set(held["source"])


def _concatenate(first, second):
    from finetune.data.mix import concatenate_and_shuffle

    return concatenate_and_shuffle([first, second], None)


def _rows(specs):
    from finetune.data.sources import read_rows

    return [row for spec in specs for row in read_rows(spec)]
