"""Preference training: DPO, ORPO and KTO through TRL's trainers.

Reference model, by adapter kind (DPO and KTO; ORPO has none):
- LoRA/QLoRA: the same model with the adapter disabled (TRL's default with a `peft_config`), so no second
  copy is held. When the run continues an earlier run's adapter (model.start_from: adapter), TRL adds a
  frozen copy of that adapter as "ref", so the reference is the earlier run's model, as in SFT -> DPO.
- full: TRL loads a frozen second copy from the model's path, unless `precompute_ref_log_probs` asks
  for the reference log-probabilities to be computed once before training (then no copy is kept).

ORPO is only in `trl.experimental` in TRL 1.16 (KTO was promoted to `trl`). It is offered because users
expect it and it trains here (tests/test_preference.py checks its loss falls); `check_orpo_available`
refuses the recipe before anything loads if a later TRL moves or drops it.
"""

from __future__ import annotations

import importlib.util
import os

from finetune.errors import UserError
from finetune.recipe import Recipe

ORPO_MODULE = "trl.experimental.orpo"


def check_orpo_available(recipe: Recipe) -> None:
    """ORPO lives in trl.experimental, which any TRL release may change; say so before the model loads."""
    if recipe.method.kind != "orpo":
        return
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we say it in the README, once
    try:
        found = importlib.util.find_spec(ORPO_MODULE) is not None
    except ImportError:
        found = False
    if not found:
        import trl

        raise UserError(
            f"method.kind: 'orpo' uses TRL's experimental ORPOTrainer ({ORPO_MODULE}), which TRL {trl.__version__} "
            "does not have; install trl==1.16.* or use method.kind: dpo (or kto)"
        )


def build_dpo_trainer(recipe, model, tokenizer, train_ds, eval_ds, peft_config, common: dict):
    """Build TRL's DPOTrainer."""
    from trl import DPOConfig, DPOTrainer

    method = recipe.method
    args = DPOConfig(
        **common,
        beta=method.beta,
        loss_type=method.losses,
        loss_weights=method.loss_weights,
        label_smoothing=method.label_smoothing,
        precompute_ref_log_probs=method.precompute_ref_log_probs,
    )
    return DPOTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=peft_config,
    )


def build_orpo_trainer(recipe, model, tokenizer, train_ds, eval_ds, peft_config, common: dict):
    """Build TRL's (experimental) ORPOTrainer: no reference model, NLL plus an odds-ratio term."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    # ORPO's collator needs the raw columns; setting it here spares TRL's "we have set it for you" warning.
    args = ORPOConfig(**common, beta=recipe.method.beta, remove_unused_columns=False)
    return ORPOTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=peft_config,
    )


def build_kto_trainer(recipe, model, tokenizer, train_ds, eval_ds, peft_config, common: dict):
    """Build TRL's KTOTrainer on prompt/completion/label rows."""
    from trl import KTOConfig, KTOTrainer

    method = recipe.method
    args = KTOConfig(
        **common,
        beta=method.beta,
        loss_type=method.loss_type,
        desirable_weight=method.desirable_weight,
        undesirable_weight=method.undesirable_weight,
        precompute_ref_log_probs=method.precompute_ref_log_probs,
    )
    return KTOTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=peft_config,
    )


PREFERENCE_TRAINERS = {"dpo": build_dpo_trainer, "orpo": build_orpo_trainer, "kto": build_kto_trainer}


def describe_reference(trainer, recipe: Recipe) -> str:
    """Which reference model the trainer compares the policy with, in words (logged and in summary.json)."""
    if recipe.method.kind == "orpo":
        return "none (ORPO has no reference model)"
    if recipe.method.precompute_ref_log_probs:
        return "log-probabilities precomputed before training"
    if getattr(trainer, "ref_model", None) is not None:
        return f"frozen copy of {trainer.ref_model.config._name_or_path}"
    if "ref" in getattr(trainer.model, "peft_config", {}):
        return "frozen copy of the adapter this run continues"
    return "the model with its adapter disabled"


def check_prepared(recipe: Recipe, trainer, rows: int, log) -> dict:
    """What TRL kept of the training rows after tokenising; raise when it kept none.

    DPO and KTO drop rows whose prompt alone fills training.max_length (no answer token would survive
    truncation) without telling anyone; this puts the count in the log and in audit.json.
    """
    dataset = trainer.train_dataset
    kept = len(dataset)
    record = {"rows_given_to_trl": rows, "rows_kept_by_trl": kept, **_length_stats(dataset, recipe)}
    if recipe.method.kind == "kto":
        from finetune.data.pairs import kto_label_warning, label_counts

        record["desirable"], record["undesirable"] = label_counts(dataset)
        warning = kto_label_warning(dataset)
        if warning:
            log(f"warning: {warning}")
    if kept == 0:
        raise UserError(
            f"data.train: every prompt is at least training.max_length={recipe.training.max_length} tokens long, "
            "so no answer token survives truncation; raise training.max_length or shorten the prompts"
        )
    if kept < rows:
        log(
            f"warning: data.train: TRL dropped {rows - kept} of {rows} rows whose prompt alone fills "
            f"training.max_length={recipe.training.max_length}; raise it to keep them"
        )
    if record.get("truncated_rows"):
        log(
            f"warning: data.train: {record['truncated_rows']} of {kept} rows are longer than training.max_length="
            f"{recipe.training.max_length} and lose the end of their answer(s)"
        )
    return record


def _length_stats(dataset, recipe: Recipe) -> dict:
    """Token lengths (prompt + longest answer) of TRL's tokenised rows; ORPO's columns are laid out differently."""
    answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in dataset.column_names]
    if "prompt_ids" not in dataset.column_names or not answers:
        return {}
    prompts = dataset["prompt_ids"]
    columns = [dataset[c] for c in answers]
    lengths = sorted(len(p) + max(len(col[i]) for col in columns) for i, p in enumerate(prompts))
    if not lengths:
        return {}
    return {
        "truncated_rows": sum(n > recipe.training.max_length for n in lengths),
        "length_p50": lengths[len(lengths) // 2],
        "length_p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "length_max": lengths[-1],
    }
