"""Recipe sections of the preference methods (DPO, ORPO, KTO) and the rules that guard them.

The loss names and which of them read `label_smoothing` follow TRL 1.16's DPOTrainer
(`trl/trainer/dpo_trainer.py`, `_compute_loss`); a value TRL would silently ignore is refused here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finetune.recipe.section import Section, check_rules

DPOLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
]
# The only DPO losses whose formula contains label_smoothing (TRL 1.16); for the others it is a no-op.
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")

REFERENCE_HELP = (
    "Compute the reference model's log-probabilities once, before training, instead of at every step. "
    "With full fine-tuning this frees the memory of the frozen reference copy; with an adapter (whose "
    "reference is the model with the adapter disabled) it saves one forward pass per step."
)


class DPOMethod(Section):
    kind: Literal["dpo"] = Field(description="Direct preference optimisation on chosen/rejected pairs.")
    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="Strength of the pull towards the reference model (higher: stay closer). For ipo it is "
        "the regularisation tau of the IPO paper.",
    )
    loss_type: DPOLoss | list[DPOLoss] = Field(
        "sigmoid",
        description="DPO loss, or a list of losses summed with loss_weights (e.g. [sigmoid, sft] is RPO; "
        "[sigmoid, bco_pair, sft] is MPO). 'sft' (NLL on the chosen answer) only in a list.",
    )
    loss_weights: list[float] | None = Field(
        None,
        description="One weight (> 0) per entry of loss_type, when it is a list. Default: 1 each.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped. Read only by the robust, "
        "exo_pair (which needs it > 0; the paper uses 1e-3), aot and aot_unpaired losses.",
    )
    precompute_ref_log_probs: bool = Field(False, description=REFERENCE_HELP)

    @property
    def losses(self) -> list[str]:
        """loss_type as a list."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _check_losses(self) -> DPOMethod:
        losses = self.losses
        smoothed = [name for name in losses if name in SMOOTHED_LOSSES]
        check_rules(
            [
                (not losses, "loss_type", "is an empty list; name at least one loss, e.g. sigmoid"),
                (
                    len(set(losses)) != len(losses),
                    "loss_type",
                    f"names a loss twice ({losses}); list each loss once and weigh it with loss_weights",
                ),
                (
                    losses == ["sft"],
                    "loss_type",
                    "'sft' alone is supervised fine-tuning on the chosen answers, not a preference loss; "
                    "combine it (e.g. [sigmoid, sft]) or use method.kind: sft",
                ),
                (
                    self.loss_weights is not None and len(self.loss_weights) != len(losses),
                    "loss_weights",
                    f"has {len(self.loss_weights or [])} weights for {len(losses)} loss(es) in loss_type "
                    f"{losses}; give one weight per loss",
                ),
                (
                    any(w <= 0 for w in self.loss_weights or []),
                    "loss_weights",
                    f"must all be > 0, found {self.loss_weights}; drop a loss from loss_type instead of weighing it 0",
                ),
                (
                    self.label_smoothing > 0 and not smoothed,
                    "label_smoothing",
                    f"is {self.label_smoothing}, but loss_type {losses} does not use it (only "
                    f"{', '.join(SMOOTHED_LOSSES)} do); remove label_smoothing or use loss_type: robust",
                ),
                (
                    "exo_pair" in losses and self.label_smoothing == 0,
                    "label_smoothing",
                    "must be > 0 for loss_type exo_pair (its epsilon; the EXO paper recommends 1e-3)",
                ),
            ]
        )
        return self


class ORPOMethod(Section):
    kind: Literal["orpo"] = Field(
        description="Odds-ratio preference optimisation: NLL on the chosen answer plus an odds-ratio term; "
        "no reference model (TRL's experimental ORPOTrainer)."
    )
    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="Weight of the odds-ratio term next to the NLL loss (lambda in the ORPO paper).",
    )


class KTOMethod(Section):
    kind: Literal["kto"] = Field(
        description="Kahneman-Tversky optimisation on answers labelled desirable or undesirable "
        "(format: unpaired_preference, or preference pairs split into one good and one bad answer)."
    )
    beta: float = Field(
        0.1, gt=0, le=100, description="Strength of the pull towards the reference model (higher: stay closer)."
    )
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="KTO loss, or the unpaired APO-zero loss (no KL term)."
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="Weight of the desirable answers' loss; raise it when they are fewer than the undesirable ones.",
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="Weight of the undesirable answers' loss; raise it when they are fewer than the desirable ones.",
    )
    precompute_ref_log_probs: bool = Field(False, description=REFERENCE_HELP)


PreferenceMethod = DPOMethod | ORPOMethod | KTOMethod
PREFERENCE_KINDS = ("dpo", "orpo", "kto")


def preference_rules(recipe) -> list[tuple[bool, str, str]]:
    """Rules between a preference method and the rest of the recipe (checked with the other cross-section rules)."""
    method = recipe.method
    return [
        (
            method.kind == "kto" and method.loss_type == "kto" and recipe.training.micro_batch_size < 2,
            "training.micro_batch_size",
            "must be at least 2 for KTO: its KL term pairs each prompt with another row's answer in the same "
            "batch (with one row the KL estimate equals the reward); or use method.loss_type: apo_zero_unpaired",
        ),
        # Preference rows take their own path to TRL (data/preference.py), which has no mixing, hold-out or
        # skip policy yet: refuse those settings rather than ignore them.
        (
            recipe.data.eval_fraction is not None,
            "data.eval_fraction",
            f"is not supported with method.kind: {method.kind} yet; give held-out pairs in data.eval instead",
        ),
        (
            recipe.data.on_bad_row != "error",
            "data.on_bad_row",
            f"'skip' is not supported with method.kind: {method.kind} yet; fix the rows (each is named) or drop them",
        ),
        *[
            (
                spec.weight != 1.0 or spec.samples is not None,
                f"data.{split}.{i}.weight",
                f"weight/samples are not supported with method.kind: {method.kind} yet; remove them",
            )
            for split in ("train", "eval")
            for i, spec in enumerate(getattr(recipe.data, split))
        ],
    ]
