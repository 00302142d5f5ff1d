"""What a run counts across resumes: tokens seen and trained, seconds of training, and where it was resumed.

A resumed run is a new process: counters held in memory would start again from zero and summary.json would
describe the last segment only. `RunBookkeeping` is a Trainer callback whose state transformers writes into
every checkpoint's trainer_state.json (`ExportableState`); when a run resumes, the state read back from the
checkpoint carries on, and each resume is recorded with its step.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

TOKEN_COUNTS = ("num_trained_tokens", "num_input_tokens", "num_tokens")


class RunBookkeeping(TrainerCallback, ExportableState):
    """Token counts, training seconds and resume points of the whole run, kept in every checkpoint."""

    def __init__(self):
        self.tokens = dict.fromkeys(TOKEN_COUNTS, 0)
        self.train_seconds = 0.0  # of the segments before this process's
        self.resumes: list[dict] = []
        self._since: float | None = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"tokens": dict(self.tokens), "train_seconds": self.seconds(),
                                           "resumes": list(self.resumes)}}

    def seconds(self) -> float:
        """Training seconds of the whole run so far."""
        return self.train_seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):  # resumed: the checkpoint's state was loaded
            attributes = saved.get("attributes", {})
            self.tokens.update(attributes.get("tokens", {}))
            self.train_seconds = float(attributes.get("train_seconds", 0.0))
            self.resumes = [*attributes.get("resumes", []), {
                "step": state.global_step,
                "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }]
        self._since = time.perf_counter()

    def add_tokens(self, **counts: int) -> None:
        """Add a batch's counts (across processes) to the run's totals."""
        for key, value in counts.items():
            self.tokens[key] += int(value)


def find_bookkeeping(callbacks) -> RunBookkeeping | None:
    """The run's bookkeeping among a trainer's callbacks (trainers.build_* add one)."""
    return next((c for c in callbacks if isinstance(c, RunBookkeeping)), None)
