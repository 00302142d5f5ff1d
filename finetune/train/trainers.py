"""Trainer builders: the recipe's training section as TRL arguments, and one builder per method.

`TRAINERS[method.kind]` builds (never runs) the trainer; `finetune.train.run` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.recipe import Recipe
from finetune.recipe.methods import PREFERENCE_KINDS
from finetune.redact import redact_text
from finetune.run.layout import RunDir


def training_args(recipe: Recipe, precision, run_dir: Path, has_eval: bool, model=None) -> dict[str, Any]:
    """The arguments TRL's configs share, from the recipe (and the model, for what depends on its architecture)."""
    t = recipe.training
    return {
        "output_dir": str(RunDir(run_dir).checkpoints),
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
        # eval data without eval_steps is evaluated at each epoch's end (and so at the end of training):
        # listing data.eval says "evaluate", and silently never doing it was the surprise
        "eval_strategy": ("steps" if t.eval_steps else "epoch") if has_eval else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps" if t.save_steps else "no",
        "save_steps": t.save_steps or 500,
        "save_total_limit": t.save_total_limit,
        "metric_for_best_model": "eval_loss" if t.keep_best_checkpoint else None,  # protects the best from rotation
        "report_to": recipe.logging.report_to or "none",
        "run_name": redact_text(recipe.logging.run_name or recipe.name),  # trackers and training_args.bin
        "disable_tqdm": True,  # our ProgressDisplay replaces it
        "dataloader_pin_memory": precision.device == "cuda",
        # Left unset, transformers asks DDP to search every step for parameters without gradients whenever the
        # model is not a PreTrainedModel (a PeftModel is not), and torch warns on every rank that it found none.
        "ddp_find_unused_parameters": skips_parameters(model),
    }


def skips_parameters(model) -> bool:
    """Whether a forward pass can leave trainable parameters without a gradient: a mixture-of-experts model's
    router skips experts. In a dense model every trainable parameter (an adapter's, or every one) is used."""
    config = getattr(model, "config", None)
    return any(isinstance(n, int) and n > 1 for n in (getattr(config, key, None) for key in EXPERT_COUNTS))


EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # Mixtral, Qwen-MoE, DeepSeek


def _callbacks(run_dir: Path):
    from finetune.train.bookkeeping import RunBookkeeping
    from finetune.train.progress import MetricsLog, ProgressDisplay

    return [RunBookkeeping(), ProgressDisplay(), MetricsLog(RunDir(run_dir).metrics)]


def _quiet_default_printer(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def build_sft_trainer(recipe, model, tokenizer, train_ds, eval_ds, peft_config, precision, run_dir):
    """Build TRL's SFTTrainer on our pre-tokenised input_ids/labels (TRL keeps our labels as they are)."""
    from trl import SFTConfig

    from finetune.train.sft import FastSFTTrainer
    from finetune.train.sft_options import resolve_batching, resolve_lm_head, sft_config_kwargs

    if resolve_batching(recipe) in ("padding_free", "packed"):
        from finetune.train.attention import use_segment_attention

        use_segment_attention(model)  # sdpa per packed sequence, instead of one masked attention over the row
    args = SFTConfig(
        **{**training_args(recipe, precision, run_dir, eval_ds is not None, model), **sft_config_kwargs(recipe)},
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


def build_preference_trainer(recipe, model, tokenizer, train_ds, eval_ds, peft_config, precision, run_dir):
    """Build TRL's DPO, ORPO or KTO trainer (finetune/preference.py says which reference model each uses)."""
    from finetune.train.preference import PREFERENCE_TRAINERS

    common = training_args(recipe, precision, run_dir, eval_ds is not None, model)
    build = PREFERENCE_TRAINERS[recipe.method.kind]
    trainer = build(recipe, model, tokenizer, train_ds, eval_ds, peft_config, common)
    for callback in _callbacks(run_dir):
        trainer.add_callback(callback)
    _quiet_default_printer(trainer)
    return trainer


TRAINERS = {"sft": build_sft_trainer, **{kind: build_preference_trainer for kind in PREFERENCE_KINDS}}
