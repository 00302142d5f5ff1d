"""Train stage: everything cheap is checked first, then data, then the model, then TRL trains."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.lifecycle import RunLifecycle
from finetune.logs import quiet_libraries, stderr
from finetune.preflight import check_weights_format, report_longest
from finetune.recipe import LoadedRecipe, Recipe
from finetune.redact import redact_text, secret_key_paths
from finetune.trackers import check_trackers


def run_training(
    loaded: LoadedRecipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    force: bool = False,
    log=None,
    resume_command: str | None = None,
    callbacks: tuple = (),
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
    """
    log = log or stderr
    _preflight(loaded.recipe)
    with RunLifecycle(loaded, overwrite=overwrite, resume=resume, force=force, log=log,
                      resume_command=resume_command) as run:
        return _train(loaded.recipe, run, log, callbacks)


def _train(recipe: Recipe, run: RunLifecycle, log, callbacks) -> Path:
    run_dir = run.dir
    quiet_libraries()
    log(f"run directory: {run_dir}  (resolved recipe in {run_dir / 'recipe.yaml'})")

    from finetune.model import build_peft_config, load_model, load_tokenizer, resolve_precision
    from finetune.tiny import resolve_model_path

    precision = resolve_precision(recipe)
    model_path = resolve_model_path(recipe.model.path)
    check_weights_format(model_path, recipe)
    tokenizer = load_tokenizer(model_path, recipe.model)
    from finetune.data.templates import resolve_chat_template

    tokenizer.chat_template = resolve_chat_template(recipe.data.chat_template, tokenizer)
    train_ds, eval_ds = _build_data(recipe, tokenizer, run_dir, log)

    log(f"loading {recipe.model.path} ({precision.load_dtype}, {precision.device})")
    model = load_model(model_path, recipe, precision)
    trainer = TRAINERS[recipe.method.kind](
        recipe, model, tokenizer, train_ds, eval_ds, build_peft_config(recipe), precision, run_dir
    )
    _log_trainable(trainer.model, log)
    started = time.perf_counter()
    result = run.train(trainer, model_path, callbacks)
    seconds = time.perf_counter() - started
    run.finish(_save_outputs(recipe, trainer, tokenizer, run_dir, result.metrics, seconds, run.resumed_step),
               run_dir / _artifact_name(recipe))
    log(
        f"done: {run_dir / _artifact_name(recipe)}"
        + (f"; next: finetune merge {run_dir}" if recipe.adapter.kind != "full" else "")
    )
    return run_dir


def _preflight(recipe: Recipe) -> None:
    """Cheap checks that would otherwise fail after the model has loaded."""
    from finetune.data.sources import check_dataset_exists
    from finetune.model import check_quantisation_available

    check_quantisation_available(recipe)
    check_trackers(recipe)
    if secret_key_paths(recipe.name):
        raise UserError("name: looks like a secret (a token or key); it names the run directory, so it cannot "
                        "be redacted. Choose another name")
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split)):
            check_dataset_exists(spec, f"data.{split}[{i}]")


def _build_data(recipe: Recipe, tokenizer, run_dir: Path, log):
    from finetune.data.pipeline import build_preference_split, build_sft_split, check_audits

    data = recipe.data
    if recipe.method.kind == "dpo":
        train_ds, audits = build_preference_split(data.train, "data.train")
        eval_ds, eval_audits = build_preference_split(data.eval, "data.eval") if data.eval else (None, [])
    else:
        template, max_length = tokenizer.chat_template, recipe.training.max_length
        train_ds, audits = build_sft_split(data.train, "data.train", data, tokenizer, template, max_length)
        eval_ds, eval_audits = (
            build_sft_split(data.eval, "data.eval", data, tokenizer, template, max_length)
            if data.eval
            else (None, [])
        )
        for warning in check_audits(audits + eval_audits, data):
            log(f"warning: {warning}")
        report_longest(audits + eval_audits, max_length, log)
    _write_audit(audits + eval_audits, run_dir / "audit.json", log)
    return train_ds, eval_ds


def _write_audit(audits, path: Path, log) -> None:
    records = []
    for a in audits:
        record = {
            "dataset": a.name,
            "rows": a.rows,
            "kept": a.kept,
            "dropped": {reason: {"count": len(w), "first": w[:5]} for reason, w in a.dropped.items()},
            "tokens": a.tokens,
            "trained_tokens": a.trained_tokens,
            "trained_fraction": round(a.trained_fraction, 4),
            "truncated_rows": a.truncated,
            "length_p50": a.percentile(50),
            "length_p95": a.percentile(95),
            "length_max": max(a.lengths, default=0),
        }
        records.append(record)
        trained = (
            f", {a.trained_tokens}/{a.tokens} tokens trained ({a.trained_fraction:.1%})" if a.tokens else ""
        )
        dropped = sum(len(w) for w in a.dropped.values())
        log(
            f"data {a.name}: {a.kept}/{a.rows} rows kept, {dropped} dropped, {a.truncated} truncated{trained}"
        )
    path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")


def _training_args(recipe: Recipe, precision, run_dir: Path, has_eval: bool) -> dict[str, Any]:
    t = recipe.training
    return {
        "output_dir": str(run_dir / "checkpoints"),
        "per_device_train_batch_size": t.micro_batch_size,
        "per_device_eval_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps or -1,
        "max_length": t.max_length,
        "bf16": precision.bf16,
        "fp16": precision.fp16,
        "use_cpu": precision.device == "cpu",
        "activation_checkpointing": t.gradient_checkpointing,
        "optim": t.optimizer,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if has_eval and t.eval_steps else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps" if t.save_steps else "no",
        "save_steps": t.save_steps or 500,
        "save_total_limit": t.save_total_limit,
        "metric_for_best_model": "eval_loss" if t.keep_best_checkpoint else None,  # protects the best from rotation
        "report_to": recipe.logging.report_to or "none",
        "run_name": redact_text(recipe.logging.run_name or recipe.name),  # trackers and training_args.bin
        "disable_tqdm": True,  # our ProgressDisplay replaces it
        "dataloader_pin_memory": precision.device == "cuda",
    }


def _callbacks(run_dir: Path):
    from finetune.progress import MetricsLog, ProgressDisplay

    return [ProgressDisplay(), MetricsLog(run_dir / "metrics.jsonl")]


def _quiet_default_printer(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def run_sft(recipe, model, tokenizer, train_ds, eval_ds, peft_config, precision, run_dir):
    """Build TRL's SFTTrainer on our pre-tokenised input_ids/labels (TRL keeps our labels as they are)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_training_args(recipe, precision, run_dir, eval_ds is not None),
        packing=recipe.method.packing,
        packing_strategy="bfd",
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_callbacks(run_dir),
    )
    _quiet_default_printer(trainer)
    return trainer


def run_dpo(recipe, model, tokenizer, train_ds, eval_ds, peft_config, precision, run_dir):
    """Build TRL's DPOTrainer; with an adapter the reference is the base with the adapter disabled."""
    from trl import DPOConfig, DPOTrainer

    method = recipe.method
    args = DPOConfig(
        **_training_args(recipe, precision, run_dir, eval_ds is not None),
        beta=method.beta,
        loss_type=[method.loss_type],
        label_smoothing=method.label_smoothing,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_callbacks(run_dir),
    )
    _quiet_default_printer(trainer)
    return trainer


TRAINERS = {"sft": run_sft, "dpo": run_dpo}


def _log_trainable(model, log) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {trainable:,} of {total:,} ({trainable / max(total, 1):.2%})")


def _artifact_name(recipe: Recipe) -> str:
    return "model" if recipe.adapter.kind == "full" else "adapter"


def _save_outputs(
    recipe, trainer, tokenizer, run_dir: Path, metrics: dict, seconds: float, resumed_step: int | None
) -> dict:
    """Adapter (or full model) with the tokenizer and chat template used in training, and a summary."""
    out = run_dir / _artifact_name(recipe)
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    history = trainer.state.log_history
    last_eval = next((r for r in reversed(history) if "eval_loss" in r), None)
    summary = {
        "train_seconds": round(seconds, 2),
        "global_step": trainer.state.global_step,
        "final_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
        **({"eval_loss": last_eval["eval_loss"]} if last_eval else {}),
        **({"eval_perplexity": math.exp(min(last_eval["eval_loss"], 50.0))}
           if last_eval and recipe.method.kind == "sft" else {}),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        **metrics,
    }
    if resumed_step is not None:
        summary["resumed_from_step"] = resumed_step  # transformers' train_loss averages only the steps after it
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
