"""Trainer callbacks: a rich progress line in a terminal (plain lines otherwise) and metrics.jsonl."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


class ProgressDisplay(TrainerCallback):
    """Progress bar with loss, learning rate and tokens/s; one plain line per log when not a TTY."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.progress = None
        self.task = None
        self._last = (0.0, 0)  # (time, tokens) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._last = (time.perf_counter(), 0)
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, stats="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            self._print(f"step {state.global_step}/{state.max_steps}  eval_loss {logs['eval_loss']:.4f}")
            return
        if "loss" not in logs:
            return
        now, tokens = time.perf_counter(), int(logs.get("num_tokens", 0))
        rate = (tokens - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, tokens)
        stats = f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}  {rate:,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, stats=stats)
        else:
            self._print(f"step {state.global_step}/{state.max_steps}  {stats}")

    def _print(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            print(line, file=self.stream, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MetricsLog(TrainerCallback):
    """Append every logged metric to <run>/metrics.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                  "cpu_seconds": time.process_time(), **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
