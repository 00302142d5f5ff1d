"""The run directory: claim it with a lock, and never overwrite a finished run by accident.

The lock is a file created with O_CREAT|O_EXCL that names its holder (host, pid and the pid's
start time). A lock whose process is gone, or whose pid now belongs to a different process, is
stale and taken over, so a crashed or killed run never leaves its directory stuck.

A directory whose run stopped before its first step (bad data, Ctrl-C while the model loaded)
trained nothing: a plain re-run replaces it. `--overwrite` (and such a replacement) removes what
the previous run made (`RunDir.derived`: its adapter or model, merge, GGUF exports, summary) and
names it, so nothing downstream mistakes the old outputs for the new run's.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from finetune.errors import UserError
from finetune.run.checkpoints import MARKER, list_checkpoints
from finetune.run.layout import LOCK, RunDir

LOCK_NAME = LOCK


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
        if self.refuse_if_held():
            self.path.unlink(missing_ok=True)  # its process is gone: the lock is stale

    def refuse_if_held(self) -> bool:
        """Raise UserError naming a live holder of the lock; return whether a (stale) lock file is there."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return False  # released between our attempt and this read: try again
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
        return True

    def release(self) -> None:
        """Remove the lock if this object holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def claim_run_dir(run_dir: Path, *, overwrite: bool, resume: bool, log=None) -> RunLock:
    """Create and lock the run directory; refuse one that holds a run unless `overwrite` or `resume`.

    The lock is taken first, so two runs started together cannot both see an empty directory and
    both write it. A run that stopped before its first step is replaced without --overwrite. With
    --overwrite (or that replacement) the previous run's outputs are removed and named in `log`;
    its checkpoints are kept but un-committed, so a later --resume cannot pick them up.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is a file; choose another output.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    held = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if not held or resume:
        return lock
    run = RunDir(run_dir)
    failed_start = _stopped_before_start(run)
    if not overwrite and failed_start is None:
        lock.release()
        raise _holds_a_run(run)
    log = log or (lambda _: None)
    if failed_start is not None and not overwrite:
        log(f"replacing {run_dir}: its last run stopped before its first step ({failed_start}) and trained nothing")
    try:
        clear_previous_run(run, log, "--overwrite" if overwrite else "replacing")
    except BaseException:
        lock.release()
        raise
    return lock


def check_claimable(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse now, writing nothing, what claim_run_dir would refuse later (before anything heavy loads)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is a file; choose another output.dir")
    if not run_dir.is_dir():
        return
    RunLock(run_dir).refuse_if_held()  # a live holder; a stale lock is left for claim_run_dir to take over
    held = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    run = RunDir(run_dir)
    if (foreign := foreign_recipe(run)) is not None:
        raise UserError(f"output.dir: {foreign}")
    if held and not (resume or overwrite) and _stopped_before_start(run) is None:
        raise _holds_a_run(run)


def foreign_recipe(run: RunDir) -> str | None:
    """Why `run` cannot be written into whatever the flags: it holds a recipe.yaml no run wrote (every run writes
    its provenance.json with it), the user's own, which the run's resolved recipe would replace."""
    if not run.holds_only_a_recipe():
        return None
    return (f"{run.root} holds a {run.recipe.name} that no run wrote (no {run.provenance.name}); a run writes its "
            f"resolved recipe there, over that file. Choose another directory with --set output.dir=runs/NAME")


def _holds_a_run(run: RunDir) -> UserError:
    hint = " pass --resume to continue it," if list_checkpoints(run.checkpoints)[0] else ""
    return UserError(
        f"output.dir: {run.root} already holds a run;{hint} pass --overwrite to write into it, "
        f"or choose another directory with --set output.dir=..."
    )


def _stopped_before_start(run: RunDir) -> str | None:
    """The status of a run here that stopped before its first step, else None."""
    from finetune.run.records import read_provenance

    if not run.exists():
        return None
    try:
        provenance = read_provenance(run.provenance)
    except UserError:
        return None  # unreadable: not ours to judge, so --overwrite it is
    return provenance.status if provenance is not None and provenance.before_start else None


def clear_previous_run(run: RunDir, log, why: str) -> None:
    """Remove what the previous run here made (RunDir.derived) and un-commit its checkpoints, naming both."""
    import shutil

    derived = run.derived()
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in derived)
    for path in derived:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if derived:
        log(f"{why}: removed what the previous run in {run.root} made: {names}")
    previous = list_checkpoints(run.checkpoints)[0]
    for checkpoint in previous:
        (checkpoint / MARKER).unlink()
    if previous:
        log(f"warning: {why}: the {len(previous)} checkpoint(s) of the previous run in {run.checkpoints} are kept "
            "but will not be resumed from")
