"""Turn the recipe's adapter section into a PEFT config (None for full fine-tuning)."""

from __future__ import annotations

import math

from finetune.errors import UserError
from finetune.recipe.schema import (
    AdaLoraAdapter,
    IA3Adapter,
    LoraFields,
    PrefixTuningAdapter,
    PromptTuningAdapter,
    Recipe,
    TargetRegex,
    TrainingSection,
)

# Our init names -> LoraConfig.init_lora_weights. LoftQ starts as a default adapter; hooks.apply_loftq
# then rewrites its weights (PEFT's own LoftQ code runs on CUDA only).
LORA_INIT = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "pissa_fast": "pissa_niter_16",
    "olora": "olora",
    "loftq": True,
}


def build_peft_config(recipe: Recipe, *, model_path: str, hidden_size: int | None, total_steps: int | None):
    """The PEFT config of the recipe's adapter.

    Args:
        recipe: The validated recipe.
        model_path: Local path (or Hub id) of the base, for prompt tuning's text init.
        hidden_size: The model's hidden size (prefix tuning's projection default).
        total_steps: Optimizer steps of the whole run (AdaLoRA's schedule is a fraction of them).
    """
    adapter = recipe.adapter
    common = {"task_type": "CAUSAL_LM"}
    if isinstance(adapter, LoraFields):
        from peft import LoraConfig

        return LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=_targets(adapter.target_modules),
            layers_to_transform=adapter.layer_indices,
            use_dora=adapter.use_dora,
            use_rslora=adapter.use_rslora,
            init_lora_weights=LORA_INIT[adapter.init],
            modules_to_save=adapter.modules_to_save or None,
            **common,
        )
    if isinstance(adapter, AdaLoraAdapter):
        from peft import AdaLoraConfig

        tinit, tfinal = adalora_schedule(adapter, total_steps)
        return AdaLoraConfig(
            init_r=adapter.init_r,
            target_r=adapter.target_r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=_targets(adapter.target_modules),
            layers_to_transform=adapter.layer_indices,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=adapter.rank_update_interval,
            beta1=adapter.beta1,
            beta2=adapter.beta2,
            orth_reg_weight=adapter.orth_reg_weight,
            total_step=total_steps,
            modules_to_save=adapter.modules_to_save or None,
            **common,
        )
    if isinstance(adapter, IA3Adapter):
        from peft import IA3Config

        return IA3Config(
            target_modules=_targets(adapter.target_modules),
            feedforward_modules=adapter.feedforward_modules,
            modules_to_save=adapter.modules_to_save or None,
            **common,
        )
    if isinstance(adapter, PromptTuningAdapter):
        from peft import PromptTuningConfig

        text = adapter.init == "text"
        return PromptTuningConfig(
            num_virtual_tokens=adapter.num_virtual_tokens,
            prompt_tuning_init="TEXT" if text else "RANDOM",
            prompt_tuning_init_text=adapter.init_text,
            tokenizer_name_or_path=model_path if text else None,
            **common,
        )
    if isinstance(adapter, PrefixTuningAdapter):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            num_virtual_tokens=adapter.num_virtual_tokens,
            prefix_projection=adapter.prefix_projection,
            encoder_hidden_size=adapter.projection_hidden_size or hidden_size,
            **common,
        )
    return None


def _targets(selection):
    # PEFT reads a string as a regex (or 'all-linear') and a list as names.
    return selection.regex if isinstance(selection, TargetRegex) else selection


def adalora_schedule(adapter: AdaLoraAdapter, total_steps: int | None) -> tuple[int, int]:
    """AdaLoRA's tinit and tfinal in steps, from the recipe's fractions of the run's real step count.

    tfinal is at least 1: PEFT fixes the final ranks at step total - tfinal, and the last step it sees is
    total - 1, so with tfinal = 0 the ranks would never be fixed (the saved adapter keeps every rank).
    """
    if not total_steps:
        raise ValueError("AdaLoRA needs the run's total step count")
    tinit = math.floor(adapter.rank_warmup_ratio * total_steps)
    tfinal = max(1, math.floor(adapter.rank_final_ratio * total_steps))
    if total_steps - tinit - tfinal < 1:
        raise UserError(
            f"adapter.rank_warmup_ratio / rank_final_ratio: this run has only {total_steps} optimizer steps, which "
            f"leaves none for AdaLoRA to prune ranks after {tinit} warm-up and {tfinal} final steps; train longer "
            "(training.epochs or max_steps) or lower the ratios"
        )
    return tinit, tfinal


def total_optimizer_steps(rows: int, training: TrainingSection, world_size: int = 1) -> int:
    """Optimizer steps of the run, as transformers' Trainer counts them (Trainer.set_initial_training_values).

    Batches per epoch are ceil(rows / (micro_batch * processes)) (no batch is dropped); an epoch's last
    partial accumulation still makes a step.
    """
    if training.max_steps:
        return training.max_steps
    batches = math.ceil(rows / (training.micro_batch_size * world_size))
    per_epoch = max(math.ceil(batches / training.gradient_accumulation_steps), 1)
    return math.ceil(training.epochs * per_epoch)
