"""Train stage: everything cheap is checked first, then data, then the model, then TRL trains.

Ctrl-C at any moment ends with one line saying what was interrupted and what to do (exit 130):
during training a checkpoint is saved first (train.interrupt.StopRequest); before the first step
the run is marked interrupted-before-start, and the same command replaces it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from finetune.errors import UserError
from finetune.launch.processes import is_main_process, main_process_first, zero3_weight_loading
from finetune.logs import stderr
from finetune.recipe import LoadedRecipe, Recipe
from finetune.recipe.methods import PREFERENCE_KINDS
from finetune.run import records
from finetune.run.layout import RunDir
from finetune.train.checks import check_before_claim, report_longest
from finetune.train.interrupt import Stage, interruptible
from finetune.train.lifecycle import RunLifecycle
from finetune.train.memory import peak_memory
from finetune.train.startup import freeze_startup_objects, keep_freed_memory
from finetune.train.trainers import TRAINERS


def run_training(
    loaded: LoadedRecipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    force: bool = False,
    log=None,
    resume_command: str | None = None,
    callbacks: tuple = (),
    launched: bool = False,
    ignore_memory_plan: bool = False,
) -> Path:
    """Run a validated recipe end to end and return the run directory.

    Args:
        loaded: The validated recipe.
        overwrite: Write into a run directory that already holds a run.
        resume: A checkpoint or run directory to continue from, or checkpoints.LATEST for the
            latest complete checkpoint of this run.
        force: Resume even when the recipe or data changed since the checkpoint.
        log: Where status lines go (default: stderr).
        resume_command: The command printed when a signal interrupts the run.
        callbacks: Extra Trainer callbacks, run before the one that commits checkpoints (tests use
            them to fail at a chosen step).
        launched: This is one process of a multi-process run (finetune.launch), whose launcher has
            already claimed the run directory and written the resolved recipe this process was given.
        ignore_memory_plan: Train even when the memory plan (finetune plan) says the run will not fit.
    """
    log = log or stderr
    recipe = loaded.recipe
    if recipe.distributed.strategy != "none" and not launched:
        raise UserError(
            f"distributed.strategy: '{recipe.distributed.strategy}' starts several processes; "
            "run it with `finetune train` (finetune.launch.launcher.launch_training), not in this process"
        )
    lifecycle = RunLifecycle(loaded, overwrite=overwrite, resume=resume, force=force, log=log,
                             resume_command=resume_command, launched=launched)
    # Ctrl-C at any moment: one line naming the stage it interrupted and what to do (the lifecycle records it)
    with interruptible(Stage("checking the recipe", "nothing was written; run the same command again")) as stage:
        # Everything that needs no weights, before the run directory is claimed: a typo costs seconds
        # and leaves nothing behind (train.checks lists them in order).
        start, layout = check_before_claim(loaded, ignore_memory_plan=ignore_memory_plan, log=log,
                                           lifecycle=lifecycle)
        lifecycle.start = start
        stage.now(f"claiming {recipe.run_dir}", "run the same command again")
        with lifecycle as run:
            again = f"nothing was trained; run `{run.resume_command.removesuffix(' --resume')}` again (it " \
                    f"replaces {run.dir})"
            stage.now("starting the run", again)
            return _train(recipe, start, layout, run, log, callbacks, stage)


def _train(recipe: Recipe, start, layout, run: RunLifecycle, log, callbacks, stage: Stage) -> Path:
    run_dir = run.run
    log(f"run directory: {run_dir.root}  (resolved recipe in {run_dir.recipe})")

    from finetune.model.load import load_model, prepare_tokenizer, resolve_precision
    from finetune.model.start import load_start_adapter

    precision = resolve_precision(recipe)
    stage.now("preparing the data")
    with main_process_first():  # a builtin model is built, a Hub model downloaded, once
        tokenizer, new_tokens = prepare_tokenizer(recipe, start)
    with main_process_first():  # one process prepares (and caches) the data while the others wait
        train_ds, eval_ds = _build_data(recipe, tokenizer, run_dir, log)
    total_steps = _total_steps(recipe, train_ds) if recipe.adapter.kind == "adalora" else None

    stage.now("loading the model")
    log(f"loading {start.base} ({precision.load_dtype}, {precision.device})"
        + (f" with the adapter of {start.run} to keep training" if start.adapter else ""))
    with zero3_weight_loading():
        model = load_start_adapter(load_model(start.base, recipe, precision, revision=start.revision), start)
    trainer = _build_trainer(recipe, start, layout, model, tokenizer, new_tokens, train_ds, eval_ds,
                             precision, total_steps, run_dir, log)
    stage.now("starting training")  # once steps run, StopRequest turns Ctrl-C into a checkpoint instead
    freeze_startup_objects()
    keep_freed_memory(precision.device)
    started = time.perf_counter()
    result = run.train(trainer, start.base, callbacks)
    seconds = time.perf_counter() - started
    artifact = run_dir.artifact(recipe.adapter.kind)
    stage.now(f"saving {artifact} after step {trainer.state.global_step}",
              "it may be incomplete; train again with --overwrite")
    summary = _save_outputs(recipe, trainer, tokenizer, run_dir, result.metrics, seconds, run.resumed_step)
    if summary is None:  # another process of a multi-process run: the main one writes and reports
        return run_dir.root
    run.finish(summary, artifact)
    stage.now("finishing", f"the run is complete: {artifact}")
    from finetune.train.progress import describe_reward_change

    if change := describe_reward_change(summary.model_dump()):
        log(change)
    from finetune.merge.mergeable import mergeable

    then = "merge" if mergeable(recipe.adapter.kind, getattr(recipe.adapter, "init", None)) else "chat"
    log(f"done: {artifact}; next: finetune {then} {run_dir.root}")
    return run_dir.root


def _build_trainer(recipe, start, layout, model, tokenizer, new_tokens, train_ds, eval_ds, precision, total_steps,
                   run_dir: RunDir, log):
    """The adapter on the loaded model, and the method's trainer around it (built, not run)."""
    from finetune.adapters import hooks
    from finetune.adapters.configs import build_peft_config
    from finetune.adapters.summary import count_parameters, summary_lines
    from finetune.model.vocab import fit_embeddings

    if fit_embeddings(model, tokenizer, recipe.training.seed):
        log(f"added tokens {new_tokens}: embeddings resized to {len(tokenizer)} rows")
    hooks.freeze_except(model, recipe)
    peft_config = None if start.adapter else build_peft_config(
        recipe, model_path=start.base, hidden_size=layout.hidden_size, total_steps=total_steps
    )
    trainer = TRAINERS[recipe.method.kind](
        recipe, model, tokenizer, train_ds, eval_ds, peft_config, precision, run_dir.root
    )
    hooks.prepare_trainer(trainer, recipe, run_dir.root, start.base, total_steps)
    if recipe.method.kind in PREFERENCE_KINDS:
        from finetune.train.preference import check_prepared, describe_reference

        if is_main_process():
            records.append_audit(run_dir, {"dataset": "data.train after TRL's tokenisation",
                                           **check_prepared(recipe, trainer, len(train_ds), log)})
        log(f"reference model: {describe_reference(trainer, recipe)}")
    for line in summary_lines(count_parameters(trainer.model)):
        log(line)
    if any(hasattr(p, "ds_id") for p in trainer.model.parameters()):
        log("base weights loaded straight into ZeRO-3 shards")
    return trainer


def _build_data(recipe: Recipe, tokenizer, run_dir: RunDir, log):
    """Train/eval datasets and audit.json: SFT rows tokenised (and cached) by us, preference rows by TRL.

    The tokenizer comes from model.load.prepare_tokenizer, with the recipe's chat template set.
    """
    from finetune.data.prepare import prepare_datasets

    if recipe.method.kind in PREFERENCE_KINDS:
        from finetune.data.pairs import build_preference_data

        train_ds, eval_ds, audit = build_preference_data(recipe.data, recipe.method.kind, log)
        if is_main_process():
            records.write_audit(run_dir, audit)
        return train_ds, eval_ds
    train_ds, eval_ds, audits = prepare_datasets(recipe, tokenizer, log)
    if is_main_process():
        records.write_audit(run_dir, [a.to_record() for a in audits])
    report_longest(audits, recipe.training.max_length, log)
    keep = ["input_ids", "labels"]  # our `source` tags stay in the cache and the preview
    return train_ds.select_columns(keep), eval_ds.select_columns(keep) if eval_ds is not None else None


def _total_steps(recipe: Recipe, train_ds) -> int:
    """Optimizer steps of the run, from the rows the trainer will see (packed rows when packing)."""
    import os

    from finetune.adapters.configs import total_optimizer_steps

    rows = len(train_ds)
    if recipe.method.kind == "sft" and recipe.method.packing:
        from trl.data_utils import pack_dataset

        # the same packing SFTTrainer applies (build_sft_trainer: packing_strategy bfd)
        rows = len(pack_dataset(train_ds.select_columns(["input_ids", "labels"]), recipe.training.max_length, "bfd"))
    return total_optimizer_steps(rows, recipe.training, int(os.environ.get("WORLD_SIZE", "1")))


def _save_outputs(
    recipe, trainer, tokenizer, run_dir: RunDir, metrics: dict, seconds: float, resumed_step: int | None
) -> records.Summary | None:
    """Adapter (or full model) with the tokenizer and chat template used in training, and a summary.

    Every process calls this: under ZeRO-3 or FSDP saving gathers the shards from all of them, and
    only the main process writes (it alone returns the summary).
    """
    from finetune.adapters.hooks import MUTATING_INITS, save_adapter

    out = run_dir.artifact(recipe.adapter.kind)
    main = trainer.is_world_process_zero()
    if len(getattr(trainer.model, "peft_config", {})) > 1:
        # TRL adds a frozen "ref" copy when it continues an adapter; only the trained one is the output.
        if main:
            trainer.model.save_pretrained(out, selected_adapters=["default"])
    elif getattr(recipe.adapter, "init", None) in MUTATING_INITS:
        if main:  # PiSSA/OLoRA: converted to a plain LoRA that applies to the original base
            save_adapter(trainer.model, out, recipe, run_dir.root)
    else:
        trainer.save_model(str(out))
    if not main:
        return None
    tokenizer.save_pretrained(out)
    if recipe.method.kind in PREFERENCE_KINDS:
        from finetune.train.preference import describe_reference

        metrics = {**metrics, "reference_model": describe_reference(trainer, recipe)}
    from finetune.train.bookkeeping import find_bookkeeping

    history = trainer.state.log_history  # the whole run's: a resume restores the checkpoint's history
    last_eval = next((r for r in reversed(history) if "eval_loss" in r), None)
    book = find_bookkeeping(trainer.callback_handler.callbacks)
    summary = records.Summary(
        method=recipe.method.kind,
        train_seconds=round(book.seconds() if book else seconds, 2),
        global_step=trainer.state.global_step,
        tokens={k: v for k, v in book.tokens.items() if v} or None if book else None,
        resumes=book.resumes if book else [],
        final_loss=next((r["loss"] for r in reversed(history) if "loss" in r), None),
        eval_loss=last_eval["eval_loss"] if last_eval else None,
        eval_perplexity=math.exp(min(last_eval["eval_loss"], 50.0))
        if last_eval and recipe.method.kind == "sft" else None,
        best_checkpoint=trainer.state.best_model_checkpoint,
        resumed_from_step=resumed_step,  # transformers' train_loss averages only the steps after it
        **metrics,
        **peak_memory(),
        **_metric_summary(trainer),
    )
    records.write_summary(run_dir, summary)
    return summary


def _metric_summary(trainer) -> dict:
    """First and last logged values of the losses and rewards, over the whole run (across resumes)."""
    from finetune.train.progress import PREFERENCE_KEYS

    keys = ["loss", "eval_loss", *PREFERENCE_KEYS, *("eval_" + k for k in PREFERENCE_KEYS)]
    seen: dict[str, dict[str, float]] = {}
    for record in trainer.state.log_history:
        for key in keys:
            if isinstance(record.get(key), int | float):
                seen.setdefault(key, {"first": record[key]})["last"] = record[key]
    return {"first_and_last": seen}
