"""One run's lifecycle around the trainer: claim, resume, checkpoint, interrupt, record provenance.

`RunLifecycle` is what train.py wraps a run in:

    with RunLifecycle(loaded, ...) as run:     # lock the run dir; pick and check the checkpoint;
        ...build data, model, trainer...       #   write recipe.yaml and provenance.json (redacted)
        result = run.train(trainer, ...)       # checks before step 1; Ctrl-C/SIGTERM -> checkpoint
        run.finish(summary, artifact_dir)      # provenance "completed", model card

Leaving the block releases the lock and, after an exception, records how the run ended: failed or
interrupted, and "-before-start" when no optimizer step had finished (such a run trained nothing,
so the next plain `finetune train` replaces it). In a multi-process run only the main process
(RANK 0) locks the directory and writes files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError
from finetune.recipe import LoadedRecipe, Recipe
from finetune.redact import REDACTED, redact, redact_text, secret_key_paths
from finetune.run import records
from finetune.run.checkpoints import check_resume, checkpoint_step, resolve_resume, trim_metrics, write_atomic
from finetune.run.layout import RunDir
from finetune.run.lock import claim_run_dir
from finetune.run.provenance import base_identity, finish_provenance, hash_data, start_provenance
from finetune.train.checks import check_disk, plan_disk
from finetune.train.interrupt import RunInterrupted, StopRequest
from finetune.train.trackers import tracker_env


class RunLifecycle:
    """Context manager for one training run in its run directory (see the module docstring)."""

    def __init__(self, loaded: LoadedRecipe, *, overwrite: bool, resume: str | None, force: bool, log,
                 resume_command: str | None = None, launched: bool = False, start=None):
        if resume is not None and overwrite:
            raise UserError("--resume continues a run and --overwrite starts one afresh over it: choose one")
        self.loaded, self.recipe = loaded, loaded.recipe
        self.run = RunDir.at(self.recipe.run_dir)
        self.dir = self.run.root
        self.start = start  # model.start.Start: what model.path named, recorded in the provenance
        self.trainer = None  # set by train(): its state says how many steps were done
        self.overwrite, self.resume, self.force, self.log = overwrite, resume, force, log
        self.resume_command = resume_command or f"finetune train {loaded.source} --resume"
        self.checkpoint: Path | None = None
        self.resumed_step: int | None = None  # read at the start: rotation may delete the checkpoint later
        self.data: list | None = None  # hashes of the data files (hash_data)
        self.lock = None
        self.main = os.environ.get("RANK", "0") == "0"  # torchrun and accelerate set RANK
        self.launched = launched  # a worker of finetune.launch: the launcher holds the run dir's lock
        self._restore_env = None

    def check(self) -> None:
        """Refuse, before anything heavy loads and writing nothing, what needs no model: a run dir that
        holds a run (without --overwrite or --resume) or that another process writes, and a checkpoint
        to resume that is missing or whose recipe or data changed (without --force)."""
        from finetune.run.lock import check_claimable

        if self.main and not self.launched:
            check_claimable(self.dir, overwrite=self.overwrite, resume=self.resume is not None)
        self._pick_checkpoint()

    def _pick_checkpoint(self) -> None:
        if self.resume is None or self.checkpoint is not None:
            return
        self.data = self.data or hash_data(self.recipe)
        self.checkpoint = resolve_resume(self.resume, self.dir, self.log)
        check_resume(self.checkpoint, redact(self.recipe.model_dump(mode="json")), self.data, force=self.force,
                     log=self.log)
        self.resumed_step = checkpoint_step(self.checkpoint)

    def __enter__(self) -> RunLifecycle:
        if self.main and not self.launched:
            self.lock = claim_run_dir(self.dir, overwrite=self.overwrite, resume=self.resume is not None,
                                      log=self.log)
        try:
            self._start()
        except BaseException:
            self._release()
            raise
        self._restore_env = tracker_env(self.dir)  # trackers read it when the Trainer is built
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._restore_env is not None:
            self._restore_env()
        if exc_type is not None and self.provenance.status == records.RUNNING:
            self._record(self._ended_by(exc_type))
        self._release()

    @property
    def steps_done(self) -> int:
        """Optimizer steps this run has finished (0 until the trainer has run one)."""
        return self.trainer.state.global_step if self.trainer is not None else 0

    def _ended_by(self, exc_type) -> str:
        interrupted = issubclass(exc_type, (KeyboardInterrupt, RunInterrupted))
        if self.steps_done == 0 and self.resumed_step is None:
            return records.INTERRUPTED_BEFORE_START if interrupted else records.FAILED_BEFORE_START
        return records.INTERRUPTED if interrupted else f"{records.FAILED}: {exc_type.__name__}"

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _start(self) -> None:
        plain = self.recipe.model_dump(mode="json")
        for key in secret_key_paths(plain):
            self.log(f"warning: {key} looks like a secret (a token or key); it is written as {REDACTED} everywhere")
        recipe_dict, self.data = redact(plain), self.data or hash_data(self.recipe)
        if self.resume is not None:
            self._pick_checkpoint()
            self.log(f"resuming from {self.checkpoint} (step {self.resumed_step})")
        self.recipe_yaml = yaml.safe_dump(recipe_dict, sort_keys=False, allow_unicode=True)
        self.provenance = start_provenance(
            self.recipe, self.loaded.source, self.data, resumed_from=str(self.checkpoint) if self.checkpoint else None,
            start=_start_record(self.start), base=self._base_identity() if self.main else None,
        )
        self.provenance.steps_done = self.resumed_step or 0
        if not self.main:
            return
        write_atomic(self.run.recipe, self.recipe_yaml)
        trim_metrics(self.run.metrics, self.resumed_step)
        records.write_provenance(self.run.provenance, self.provenance)

    def _base_identity(self) -> records.BaseIdentity:
        """The true base this run trains on (through earlier runs), by Hub revision or content hash."""
        if self.start is not None:  # named as the recipe names it, unless it was reached through an earlier run
            name = None if self.start.run is not None else self.recipe.model.path
            return base_identity(self.start.base, self.start.revision, name)
        return base_identity(self.recipe.model.path, self.recipe.model.revision)

    def _record(self, status: str, metrics: dict[str, Any] | None = None) -> None:
        self.provenance.steps_done = max(self.steps_done, self.resumed_step or 0)
        finish_provenance(self.provenance, status, metrics)
        if self.main:
            records.write_provenance(self.run.provenance, self.provenance)

    def train(self, trainer, model_path: str, callbacks=()):
        """Check what can be checked before step 1, then train; raise RunInterrupted after a signal."""
        stop = StopRequest(on_exit_now=self._release)
        self.trainer = trainer
        self._add_callbacks(trainer, stop, callbacks)
        self._check_before_first_step(trainer, model_path)
        with stop:
            # transformers ignores TrainingArguments.resume_from_checkpoint: it must be passed here
            result = trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
        state = trainer.state
        if stop.requested and state.global_step < state.max_steps:
            _wait_for_all_processes()  # the main process has committed the checkpoint once all are here
            saved = self.run.checkpoint(state.global_step)
            self._record(records.INTERRUPTED, {"global_step": state.global_step, "checkpoint": str(saved)})
            raise RunInterrupted(
                f"{stop.signal_name}: training stopped at step {state.global_step}/{state.max_steps}; checkpoint "
                f"saved to {saved}. Resume with:\n  {redact_text(self.resume_command)}",
                exit_code=stop.exit_code,
            )
        return result

    def _add_callbacks(self, trainer, stop: StopRequest, extra) -> None:
        """Stop-on-signal, then any extra callbacks, then the checkpoint committer (it must see their effects)."""
        from finetune.train.callbacks import CheckpointCommitter, EvalPerplexity, StopOnSignal

        if self.recipe.method.kind == "sft":
            # first in the list, so trackers and metrics.jsonl see the value (see EvalPerplexity)
            trainer.callback_handler.callbacks.insert(0, EvalPerplexity())
        for callback in (StopOnSignal(stop), *extra):
            trainer.add_callback(callback)
        save_each_epoch = self.recipe.training.save_each_epoch
        trainer.add_callback(CheckpointCommitter(self.recipe_yaml, self.data, save_each_epoch=save_each_epoch))

    def _check_before_first_step(self, trainer, model_path: str) -> None:
        """Refuse to resume a finished run; refuse a disk too small for the checkpoints."""
        total_steps, steps_per_epoch = schedule(self.recipe, trainer)
        if self.resumed_step is not None and self.resumed_step >= total_steps:
            raise UserError(
                f"--resume: {self.checkpoint} is at step {self.resumed_step} of {total_steps}: this run has finished "
                "training, and that checkpoint holds its final weights. To train more, start a new run"
            )
        plan = plan_disk(self.recipe, trainer.model, model_path, total_steps, steps_per_epoch)
        if self.main:
            check_disk(plan, self.dir, self.log)
        self.provenance.disk_estimate_bytes = {
            "weights": plan.weights, "optimizer": plan.optimizer, "checkpoint": plan.checkpoint,
            "checkpoints_at_once": plan.checkpoints, "total": plan.total,
        }

    def finish(self, summary: records.Summary, artifact_dir: Path) -> None:
        """Record the run as completed and write the model card next to its adapter or model."""
        self._record(records.COMPLETED, summary.model_dump(mode="json", exclude_none=True))
        if self.main:
            from finetune.run.card import write_training_card

            write_training_card(artifact_dir, self.provenance)


def _start_record(start) -> records.StartRecord | None:
    """What model.path named, when it was an earlier run (model.start.Start), for provenance.json."""
    if start is None or start.run is None:
        return None
    return records.StartRecord(run=str(start.run), start_from=start.start_from, sha256=start.merged_from_sha256)


def schedule(recipe: Recipe, trainer) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch), computed as transformers' Trainer does."""
    t = recipe.training
    per_epoch = math.ceil(math.ceil(len(trainer.train_dataset) / t.micro_batch_size) / t.gradient_accumulation_steps)
    return t.max_steps or math.ceil(per_epoch * t.epochs), per_epoch


def _wait_for_all_processes() -> None:
    """A barrier in a launched run (every process stops at the same, agreed step); nothing in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
