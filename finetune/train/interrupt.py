"""Ctrl-C and SIGTERM during training: stop cleanly at the next step boundary; a second signal stops at once.

A cluster scheduler sends SIGTERM some time before it kills a job, and a user presses Ctrl-C;
either way the first signal only sets a flag, which the StopOnSignal callback turns into
"save a checkpoint and stop" when the current optimizer step ends. A second signal means the
user will not wait: the process exits straight away, without a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

from finetune.errors import UserError

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that catches SIGINT/SIGTERM while training runs (main thread only)."""

    def __init__(self, on_exit_now: Callable[[], None] | None = None, stream=None):
        self.signum: int | None = None
        self.on_exit_now = on_exit_now
        self.stream = stream or sys.stderr
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def agree(self) -> bool:
        """Whether any process of the run was asked to stop; then this one takes the same signal.

        Called by every process at each step boundary (StopOnSignal): one collective, so all processes stop
        at the same step even when a signal reaches them at different times, or reaches only some of them.
        One process: no collective, just `requested`.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        signum = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if signum.item() and self.signum is None:
            self.signum = int(signum.item())  # another process's signal: stop with it, reported the same way
        return self.requested

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or 0)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(
                f"\n{signal.Signals(signum).name} received: saving a checkpoint when this step ends, then stopping "
                "(send it again to stop at once, without a checkpoint)",
                file=self.stream,
                flush=True,
            )
            return
        print(f"\n{signal.Signals(signum).name} again: stopping now, without a checkpoint", file=self.stream,
              flush=True)
        if self.on_exit_now is not None:
            self.on_exit_now()
        os._exit(128 + signum)  # skip cleanup that could block: the user asked twice

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class RunInterrupted(UserError):
    """Training stopped on a signal after saving a checkpoint; exits 128 + the signal's number."""

    label = "interrupted"

    def __init__(self, message: str, *, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Stage:
    """What `finetune train` is doing now, so that Ctrl-C at any moment can say what it interrupted and what to do."""

    def __init__(self, what: str, then: str):
        self.what, self.then = what, then

    def now(self, what: str, then: str | None = None) -> None:
        """Enter the next stage (`then`: what to do if it is interrupted; unchanged when None)."""
        self.what = what
        self.then = then or self.then


@contextlib.contextmanager
def interruptible(stage: Stage):
    """Ctrl-C inside the block ends the command with one line: what was interrupted and what to do (exit 130).

    Training itself is covered by StopRequest (a checkpoint, then a resume command); this covers
    every other moment of `finetune train`: reading the recipe, checks, data, model loading, saving.
    """
    try:
        yield stage
    except KeyboardInterrupt:
        raise RunInterrupted(f"Ctrl-C while {stage.what}; {stage.then}", exit_code=128 + signal.SIGINT) from None
