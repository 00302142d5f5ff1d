"""`finetune generate`: batched generation over a prompts file, for the model and each adapter, resumable.

Output rows are appended to OUT one batch at a time and flushed, so an interrupted run keeps what
it finished; a rerun skips every (id, model) pair already in OUT. OUT is never truncated.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from finetune.errors import UserError
from finetune.inference.load import BASE, Loaded, Sampling, generate_texts, prompt_text


def read_prompts(path: Path) -> list[dict]:
    """Prompt rows: {"prompt": str or messages} or {"messages": [...]}, with an optional "id"."""
    if not path.is_file():
        raise UserError(f"--prompts: no such file: {path}")
    rows, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: malformed JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        prompt = row.get("prompt", row.get("messages"))
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise UserError(f"{where}: needs 'prompt' (a string or a list of messages) or 'messages'")
        if isinstance(prompt, list) and prompt[-1].get("role") == "assistant":
            prompt = prompt[:-1]  # a conversation with its answer: generate that answer again
        row_id = row.get("id", number)
        if row_id in seen:
            raise UserError(f"{where}: duplicate id {row_id!r}; ids must be unique to resume")
        seen.add(row_id)
        rows.append({"id": row_id, "prompt": prompt})
    if not rows:
        raise UserError(f"--prompts: {path} has no prompts")
    return rows


def done_pairs(out: Path, log) -> set[tuple]:
    """(id, model) pairs already in OUT; unreadable lines are reported and regenerated."""
    if not out.exists():
        return set()
    done = set()
    for number, line in enumerate(out.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((_key(row["id"]), row["model"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            log(f"warning: {out}:{number} is not a finished output row; its prompt is generated again")
    return done


def _key(value):
    return json.dumps(value)


def run_generate(
    loaded: Loaded,
    prompts: list[dict],
    out: Path,
    sampling: Sampling,
    *,
    batch_size: int = 8,
    with_base: bool = False,
    log=None,
) -> int:
    """Generate for every prompt under every adapter (and the base if asked); return rows written."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    models = list(loaded.adapters) + ([BASE] if with_base or not loaded.adapters else [])
    done = done_pairs(out, log)
    todo = [(model, row) for model in models for row in prompts if (_key(row["id"]), model) not in done]
    skipped = len(models) * len(prompts) - len(todo)
    if skipped:
        log(f"resuming: {skipped} outputs already in {out}, {len(todo)} to go")
    out.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
    progress = _Progress(len(todo), log)
    written = 0
    with out.open("a", encoding="utf-8") as handle:
        if needs_newline:  # an interrupted write left half a line: start ours on a fresh one
            handle.write("\n")
        for model in models:
            batch_rows = [row for m, row in todo if m == model]
            for start in range(0, len(batch_rows), batch_size):
                batch = batch_rows[start : start + batch_size]
                texts = [prompt_text(loaded.tokenizer, row["prompt"]) for row in batch]
                with loaded.use(model):
                    outputs = generate_texts(loaded, texts, sampling)
                for row, output in zip(batch, outputs, strict=True):
                    record = {"id": row["id"], "model": model, "prompt": row["prompt"], "output": output}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                written += len(batch)
                progress.advance(len(batch), model)
    progress.close()
    return written


class _Progress:
    """A rich progress bar on a terminal, a line per batch otherwise."""

    def __init__(self, total: int, log):
        self.total, self.done, self.log, self.started = total, 0, log, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty() and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[model]}"),
            )
            self.bar.start()
            self.task = self.bar.add_task("generate", total=total, model="")

    def advance(self, n: int, model: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, model=model)
        else:
            self.log(f"generate {self.done}/{self.total} ({model}, {time.perf_counter() - self.started:.0f} s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
