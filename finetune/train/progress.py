"""Trainer callbacks: a rich progress line in a terminal (plain lines otherwise) and metrics.jsonl."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

# What preference trainers (DPO, ORPO, KTO) log about the implicit reward r = beta * log(pi / pi_ref):
# its mean on chosen and rejected answers, their difference, and how often chosen beats rejected.
PREFERENCE_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def preference_stats(logs: dict, prefix: str = "") -> str:
    """'acc 0.94  margin 1.33 (chosen -0.78, rejected -2.11)' from whichever reward metrics were logged."""
    get = {key: logs.get(prefix + key) for key in PREFERENCE_KEYS}
    parts = []
    if get["rewards/accuracies"] is not None:
        parts.append(f"acc {get['rewards/accuracies']:.2f}")
    if get["rewards/margins"] is not None:
        detail = (
            f" (chosen {get['rewards/chosen']:+.2f}, rejected {get['rewards/rejected']:+.2f})"
            if get["rewards/chosen"] is not None and get["rewards/rejected"] is not None
            else ""
        )
        parts.append(f"margin {get['rewards/margins']:+.2f}{detail}")
    return "  ".join(parts)


def memory_in_use() -> str:
    """Peak CUDA memory allocated on a GPU, else the process's resident memory (RSS)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"cuda max {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    import psutil  # a dependency of accelerate

    return f"rss {psutil.Process().memory_info().rss / 2**20:,.0f} MiB"


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressDisplay(TrainerCallback):
    """Progress bar with ETA, loss, learning rate, tokens/s and memory; plain lines when not a TTY."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.progress = None
        self.task = None
        self._last = (0.0, 0)  # (time, tokens) at the previous log
        self._start: tuple[float, int] | None = None  # (time, step) when this process began training

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._last = (time.perf_counter(), 0)
        self._start = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, stats="")

    def on_step_begin(self, args, state, control, **kwargs):
        if self._start is None:  # here, not in on_train_begin: a resumed run's step is known only now
            self._start = (time.perf_counter(), state.global_step)
            self._last = (self._start[0], self._last[1])
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def eta(self, state) -> str:
        """Time left at the pace of the steps this process has run."""
        if self._start is None or state.global_step <= self._start[1]:
            return "?"
        pace = (time.perf_counter() - self._start[0]) / (state.global_step - self._start[1])
        return format_eta(pace * (state.max_steps - state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            rewards = preference_stats(logs, "eval_")
            ppl = f"  perplexity {logs['eval_perplexity']:.3f}" if "eval_perplexity" in logs else ""
            self._print(
                f"step {state.global_step}/{state.max_steps}  eval_loss {logs['eval_loss']:.4f}{ppl}"
                + (f"  eval {rewards}" if rewards else "")
            )
            return
        if "loss" not in logs:
            return
        now, tokens = time.perf_counter(), int(logs.get("num_tokens", 0))
        rate = (tokens - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, tokens)
        rewards = preference_stats(logs)
        stats = (
            f"loss {logs['loss']:.4f}  "
            + (f"{rewards}  " if rewards else "")
            + f"lr {logs.get('learning_rate', 0):.2e}"
            + (f"  {rate:,.0f} tok/s" if "num_tokens" in logs else "")  # ORPO does not count tokens
            + f"  {memory_in_use()}"
        )
        if self.progress is not None:
            self.progress.update(self.task, stats=stats)
        else:
            self._print(f"step {state.global_step}/{state.max_steps}  {stats}  eta {self.eta(state)}")

    def _print(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MetricsLog(TrainerCallback):
    """Append every logged metric to <run>/metrics.jsonl (main process only); remember first and last values."""

    def __init__(self, path: Path):
        self.path = path
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def summary(self) -> dict:
        """First and last logged loss and reward metrics (train and eval), for summary.json."""
        keys = ["loss", "eval_loss", *PREFERENCE_KEYS, *("eval_" + k for k in PREFERENCE_KEYS)]
        return {
            "first_and_last": {
                key: {"first": self.first[key], "last": self.last[key]} for key in keys if key in self.first
            }
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        for key, value in logs.items():
            if isinstance(value, int | float):
                self.first.setdefault(key, value)
                self.last[key] = value
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                  "cpu_seconds": time.process_time(), **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def describe_reward_change(summary: dict) -> str | None:
    """'reward accuracy 0.00 -> 0.94, margin +0.00 -> +1.33' from MetricsLog.summary(), or None."""
    seen = summary.get("first_and_last", {})
    parts = []
    for prefix, label in (("", "train"), ("eval_", "eval")):
        acc, margin = seen.get(prefix + "rewards/accuracies"), seen.get(prefix + "rewards/margins")
        text = []
        if acc:
            text.append(f"reward accuracy {acc['first']:.2f} -> {acc['last']:.2f}")
        if margin:
            text.append(f"margin {margin['first']:+.2f} -> {margin['last']:+.2f}")
        if text:
            parts.append(f"{label}: " + ", ".join(text))
    return "; ".join(parts) or None
