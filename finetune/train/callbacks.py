"""Trainer callbacks of the run lifecycle: commit checkpoints, stop on a signal, add eval perplexity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.run.checkpoints import MARKER, commit_checkpoint
from finetune.train.interrupt import StopRequest


class CheckpointCommitter(TrainerCallback):
    """Commits every checkpoint the Trainer saves; un-commits one about to be overwritten; saves at epoch ends."""

    def __init__(self, recipe_yaml: str, data: list[dict[str, Any]], *, save_each_epoch: bool):
        self.recipe_yaml = recipe_yaml
        self.data = data
        self.save_each_epoch = save_each_epoch

    def _target(self, args, state) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def _uncommit_target(self, args, state, control) -> None:
        # Resuming from an older checkpoint rewrites later ones: drop their marker first, so a crash
        # while rewriting never leaves old marker + half-new files that look complete.
        if control.should_save and state.is_world_process_zero:
            (self._target(args, state) / MARKER).unlink(missing_ok=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._uncommit_target(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.save_each_epoch:
            control.should_save = True
        self._uncommit_target(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        samples = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
        commit_checkpoint(
            self._target(args, state),
            step=state.global_step,
            epoch=state.epoch,
            samples=samples * args.world_size,
            recipe_yaml=self.recipe_yaml,
            data=self.data,
        )


class StopOnSignal(TrainerCallback):
    """Turns a caught SIGINT/SIGTERM into "save a checkpoint and stop" at the end of the current step."""

    def __init__(self, request: StopRequest):
        self.request = request

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.agree():  # every process of a launched run decides the same, at the same step
            control.should_save = True
            control.should_training_stop = True


class EvalPerplexity(TrainerCallback):
    """Adds eval_perplexity = exp(eval_loss) to eval logs (SFT: the loss is the mean token cross-entropy).

    It must run before the other callbacks' on_log (trackers, metrics.jsonl, display), so it is
    inserted first in the Trainer's list: Trainer.evaluate logs the metrics before on_evaluate
    fires, so adding the value there would reach no tracker.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
