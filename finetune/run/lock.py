"""The run directory: claim it with a lock, and never overwrite a finished run by accident.

The lock is a file created with O_CREAT|O_EXCL that names its holder (host, pid and the pid's
start time). A lock whose process is gone, or whose pid now belongs to a different process, is
stale and taken over, so a crashed or killed run never leaves its directory stuck.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from finetune.errors import UserError

LOCK_NAME = ".finetune.lock"


def _process_start_time(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses; fields after the last ')' are fixed
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now = _process_start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """Exclusive claim on a run directory by this process; release() or the process's death frees it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raise UserError naming the holder if it is alive."""
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the run lock (another process keeps taking it)")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released between our attempt and this read: try again
        except (OSError, ValueError):
            holder = {}  # a lock torn by a crash while being written: nobody holds it
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and _alive(pid, holder.get("started")):
            raise UserError(
                f"{self.path.parent}: another finetune run (pid {pid}, since {holder.get('since')}) is writing "
                "this run directory; wait for it to finish, or stop it, or choose another output.dir"
            )
        if isinstance(pid, int) and host not in (None, socket.gethostname()):
            raise UserError(
                f"{self.path.parent}: locked by a finetune run on host {host} (pid {pid}, since "
                f"{holder.get('since')}); if that run is gone, delete {self.path}"
            )
        self.path.unlink(missing_ok=True)  # its process is gone: the lock is stale

    def release(self) -> None:
        """Remove the lock if this object holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def claim_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> RunLock:
    """Create and lock the run directory; refuse one that holds a run unless `overwrite` or `resume`.

    Nothing is deleted either way. The lock is taken first, so two runs started together cannot
    both see an empty directory and both write it.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is a file; choose another output.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        _refuse_held(run_dir, overwrite=overwrite, resume=resume)
    except UserError:
        lock.release()
        raise
    return lock


def check_claimable(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse now, writing nothing, what claim_run_dir would refuse later (before anything heavy loads)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is a file; choose another output.dir")
    if not run_dir.is_dir():
        return
    lock = RunLock(run_dir)
    if lock.path.exists():
        lock._take_over_if_stale()  # raises if a live process holds it; removes a stale one
    _refuse_held(run_dir, overwrite=overwrite, resume=resume)


def _refuse_held(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    held = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if held and not (overwrite or resume):
        checkpoints = run_dir / "checkpoints"
        hint = " pass --resume to continue it," if checkpoints.is_dir() and any(checkpoints.iterdir()) else ""
        raise UserError(
            f"output.dir: {run_dir} already holds a run;{hint} pass --overwrite to write into it, "
            f"or choose another directory with --set output.dir=..."
        )
