"""One training process of a launched run: `python -m finetune.launch.worker RUN_DIR/recipe.yaml`.

`finetune train` starts these through `accelerate launch` after writing the resolved recipe. Every
worker reads that one file, with no overrides, so all processes train exactly the recipe the
launcher validated. Only where to resume reaches them on the command line (`--resume CHECKPOINT`,
`--force`), chosen once by the launcher so that every process resumes the same checkpoint.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from finetune.errors import UserError
from finetune.launch.processes import is_local_main_process, is_main_process
from finetune.logs import stderr
from finetune.run.layout import RunDir
from finetune.train.interrupt import RunInterrupted


def run_worker(recipe_path: Path, resume: str | None = None, force: bool = False) -> Path:
    """Train the resolved recipe of a run as one of its processes (resuming a checkpoint, if given)."""
    import os

    from finetune.recipe import load_recipe
    from finetune.train.run import run_training
    from finetune.train.startup import skip_unused_packages

    loaded = load_recipe(recipe_path)
    skip_unused_packages(loaded.recipe)  # before anything imports transformers: this process runs one recipe
    run_dir = Path(loaded.recipe.run_dir)
    if not recipe_path.parent.resolve() == run_dir.resolve():
        raise UserError(
            f"{recipe_path}: this resolved recipe belongs to run directory {run_dir}, relative to where "
            "`finetune train` ran; start the workers from that directory (see launch.sh next to the recipe)"
        )
    return run_training(loaded, launched=True, log=stderr if is_main_process() else _silent, resume=resume,
                        force=force, resume_command=os.environ.get("FINETUNE_RESUME_COMMAND"))


def _silent(_: str) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    force = "--force" in args
    args = [a for a in args if a != "--force"]
    resume = None
    if len(args) == 3 and args[1] == "--resume":
        resume, args = args[2], args[:1]
    if len(args) != 1:
        print("usage: python -m finetune.launch.worker RUN_DIR/recipe.yaml [--resume CHECKPOINT [--force]] "
              "(started by `finetune train`)", file=sys.stderr)
        sys.exit(2)
    recipe_path = Path(args[0])
    try:
        run_worker(recipe_path, resume, force)
        _leave_the_group()
    except UserError as exc:
        # Every process meets the same recipe and data, so one message per machine is enough; the
        # launcher repeats it after the launcher's own report of the failed processes.
        if is_local_main_process():
            print(f"error: {exc.render()}", file=sys.stderr, flush=True)
            RunDir(recipe_path.parent).launch_error.write_text(exc.render() + "\n", encoding="utf-8")
        if isinstance(exc, RunInterrupted):
            _wait_for_the_others()  # torch's launcher stops the rest as soon as one process exits
        _leave_the_group()
        sys.exit(exc.exit_code)


def _wait_for_the_others() -> None:
    """A barrier, where the processes still form a group: nobody exits before the message is written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a process already gone: exiting is all that is left to do
            dist.barrier()


def _leave_the_group() -> None:
    """Destroy the process group before the interpreter exits, as torch asks.

    Left to the interpreter's teardown, the group's C++ threads can be destroyed while still running: a rank
    that finished its run then aborts ("terminate called without an active exception", exit -6), and the
    launcher reports the whole run as failed (seen once in CI, in the resumed half of
    tests/test_distributed.py's SIGINT test).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
