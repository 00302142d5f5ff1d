"""Train stage: everything cheap is checked first, then data, then the model, then TRL trains."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.logs import quiet_libraries, stderr
from finetune.plan import check_memory, peak_memory
from finetune.recipe import LoadedRecipe, Recipe
from finetune.recipe.dump import write_recipe


def run_training(loaded: LoadedRecipe, *, overwrite: bool = False, force: bool = False, log=None) -> Path:
    """Run a validated recipe end to end and return the run directory."""
    log = log or stderr
    recipe = loaded.recipe
    _preflight(recipe)
    quiet_libraries()
    from finetune.model import build_peft_config, load_model, load_tokenizer, resolve_precision
    from finetune.tiny import resolve_model_path

    precision = resolve_precision(recipe)
    model_path = resolve_model_path(recipe.model.path)
    check_memory(recipe, model_path, precision.device, force=force, log=log)
    run_dir = claim_run_dir(Path(recipe.run_dir), overwrite=overwrite)
    write_recipe(recipe, run_dir / "recipe.yaml")
    log(f"run directory: {run_dir}  (resolved recipe in {run_dir / 'recipe.yaml'})")

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
    result = trainer.train()
    _save_outputs(recipe, trainer, tokenizer, run_dir, result.metrics, time.perf_counter() - started)
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
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split)):
            check_dataset_exists(spec, f"data.{split}[{i}]")


def claim_run_dir(run_dir: Path, *, overwrite: bool) -> Path:
    """Create the run directory; refuse a non-empty one unless `overwrite` (nothing is deleted either way)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is a file; choose another output.dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(
            f"output.dir: {run_dir} already holds a run; pass --overwrite to write into it, "
            f"or choose another directory with --set output.dir=..."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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
        "torch_compile": t.compile,
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
        "report_to": recipe.logging.report_to or "none",
        "run_name": recipe.logging.run_name or recipe.name,
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
    from trl import SFTConfig

    from finetune.sft_options import resolve_lm_head, sft_config_kwargs
    from finetune.sft_trainer import FastSFTTrainer

    args = SFTConfig(
        **{**_training_args(recipe, precision, run_dir, eval_ds is not None), **sft_config_kwargs(recipe)},
        dataset_num_proc=None,
    )
    trainer = FastSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_callbacks(run_dir),
        lm_head=resolve_lm_head(recipe, precision.device),
        token_metrics=recipe.training.token_metrics,
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


def _save_outputs(recipe, trainer, tokenizer, run_dir: Path, metrics: dict, seconds: float) -> None:
    """Adapter (or full model) with the tokenizer and chat template used in training, and a summary."""
    out = run_dir / _artifact_name(recipe)
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {"train_seconds": round(seconds, 2), "global_step": trainer.state.global_step, **metrics,
               **peak_memory()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
