"""The recipe schema: one pydantic model per section, unknown keys rejected.

Cross-field rules live on the section they guard and raise; they never rewrite a value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

PositiveInt = Annotated[int, Field(gt=0)]


class RuleViolations(ValueError):
    """Raised by a cross-field rule; carries one (key path, message) per broken rule.

    Pydantic keeps the exception in the error's context, so the loader can report each problem
    at its own key path and YAML line instead of one message at the section.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))
        self.problems = problems


def check_rules(rules: list[tuple[bool, str, str]]) -> None:
    """Raise RuleViolations for every (broken, key path, message) whose condition holds."""
    problems = [(path, msg) for broken, path, msg in rules if broken]
    if problems:
        raise RuleViolations(problems)


class Section(BaseModel):
    """Base of every recipe section: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)


class ModelSection(Section):
    path: str = Field(
        description="Base model: a local directory, a Hub id (org/name), or 'builtin:tiny-llama' / "
        "'builtin:tiny-qwen3' for the offline tiny models."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype the base weights are loaded in. 'auto' takes bfloat16 on a GPU that supports it, "
        "else float32.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="Attention kernel. flash_attention_2 needs the flash-attn package and a GPU."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Only for sources you trust."
    )


class DatasetSpec(Section):
    path: str = Field(
        description="A local .jsonl/.json/.parquet/.csv file, a Hub dataset id, or 'builtin:<file>' "
        "for the sample data shipped with finetune (e.g. builtin:sample_chat.jsonl)."
    )
    format: Literal["messages", "prompt_completion", "preference"] = Field(
        "messages",
        description="Row shape: 'messages' (OpenAI chat: a list of {role, content}), "
        "'prompt_completion' ({prompt, completion}, strings or message lists), "
        "'preference' ({prompt, chosen, rejected}, for DPO).",
    )
    split: str = Field("train", description="Split to read (Hub datasets and dataset folders).")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    max_rows: PositiveInt | None = Field(None, description="Use only the first N rows of this dataset.")


class DataSection(Section):
    train: list[DatasetSpec] = Field(min_length=1, description="Datasets to train on, concatenated.")
    eval: list[DatasetSpec] = Field(
        default_factory=list, description="Held-out datasets for evaluation during training."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template to use instead of the tokenizer's own: a built-in name "
        "(chatml, llama-3, mistral, gemma, qwen3) or a path to a .jinja file. "
        "The template used is saved with the output tokenizer.",
    )
    train_on: Literal["all_assistant", "last_assistant", "all"] = Field(
        "all_assistant",
        description="Which tokens carry loss: every assistant turn (content + end-of-turn token), "
        "only the last assistant turn, or every token.",
    )
    min_trainable_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Warn when fewer than this fraction of a dataset's tokens are trained on.",
    )


class SFTMethod(Section):
    kind: Literal["sft"] = Field(description="Supervised fine-tuning.")
    packing: bool = Field(
        False,
        description="Pack several rows into one sequence (padding-free; rows do not attend to each other).",
    )


DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero"]


class DPOMethod(Section):
    kind: Literal["dpo"] = Field(description="Direct preference optimisation on chosen/rejected pairs.")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    loss_type: DPOLossType = Field("sigmoid", description="DPO loss variant.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label noise (conservative DPO).")


Method = Annotated[SFTMethod | DPOMethod, Field(discriminator="kind")]


class LoraFields(Section):
    r: PositiveInt = Field(16, description="LoRA rank.")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or / sqrt(r) with rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' or a list of module names (e.g. [q_proj, v_proj]).",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full next to the adapter and saved with it "
        "(e.g. [lm_head, embed_tokens] when new tokens are added).",
    )


class FullAdapter(Section):
    kind: Literal["full"] = Field(description="Train every weight of the model; no adapter.")


class LoraAdapter(LoraFields):
    kind: Literal["lora"] = Field("lora", description="LoRA adapter on a frozen base in its dtype.")


class QLoraAdapter(LoraFields):
    kind: Literal["qlora"] = Field(description="LoRA on a 4-bit (bitsandbytes) quantised base.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )


def _adapter_kind(value) -> str | None:
    # `adapter: {r: 8}` means LoRA, the section's default, rather than "kind is missing"
    if isinstance(value, dict):
        return value.get("kind", "lora")
    return getattr(value, "kind", None)


Adapter = Annotated[
    Annotated[FullAdapter, Tag("full")]
    | Annotated[LoraAdapter, Tag("lora")]
    | Annotated[QLoraAdapter, Tag("qlora")],
    Discriminator(_adapter_kind),
]


class TrainingSection(Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps.")
    micro_batch_size: PositiveInt = Field(4, description="Rows per device per forward pass.")
    gradient_accumulation_steps: PositiveInt = Field(1, description="Forward passes per optimizer step.")
    max_length: PositiveInt = Field(
        1024, description="Longest sequence in tokens; longer rows are truncated."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Mixed precision. 'auto': bf16 on a GPU that supports it, else fp32 (always on a CPU).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    batching: Literal["auto", "grouped", "padding_free", "padded"] = Field(
        "auto",
        description="How SFT rows become micro-batches (without method.packing): 'grouped' (rows of similar length "
        "together, little padding), 'padding_free' (a batch's rows concatenated without padding; fastest with "
        "flash_attention_2), 'padded' (random batches padded to their longest row). 'auto': padding_free with "
        "flash_attention_2, else grouped. The loss of a batch is the same either way.",
    )
    lm_head: Literal["auto", "chunked", "full_logits"] = Field(
        "auto",
        description="How the SFT loss runs the LM head: 'chunked' (TRL's fused head; the logits are never held in "
        "memory), 'full_logits' (the model's own logits and cross-entropy: faster on a CPU, batch x length x vocab "
        "fp32 logits in memory). 'auto': chunked on a GPU, full_logits on a CPU. Same loss either way.",
    )
    token_metrics: bool = Field(
        False,
        description="Log the entropy and top-1 accuracy of the trained tokens (TRL's metrics, computed in the chunked "
        "LM head on every step; off saves that compute and leaves the loss unchanged).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model. Compiling takes minutes and recompiles for new shapes; it can pay on "
        "long GPU runs.",
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = Field(
        "adamw_torch_fused",
        description="Optimizer. adamw_torch_fused updates all parameters in one kernel (transformers' default; "
        "same result as adamw_torch to float rounding, ~4x faster on a CPU); adamw_8bit needs bitsandbytes.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for weights of new modules, shuffling and dropout.")
    logging_steps: PositiveInt = Field(10, description="Log metrics every N optimizer steps.")
    eval_steps: PositiveInt | None = Field(None, description="Evaluate every N steps (needs data.eval).")
    save_steps: PositiveInt | None = Field(None, description="Save a checkpoint every N steps.")
    save_total_limit: PositiveInt | None = Field(2, description="Keep at most this many checkpoints.")


class DistributedSection(Section):
    strategy: Literal["none"] = Field(
        "none", description="How training is spread over processes. Only 'none' (one process) for now."
    )


class LoggingSection(Section):
    report_to: list[Literal["wandb", "tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers to send metrics to (metrics.jsonl is always written).",
    )
    run_name: str | None = Field(
        None, description="Name of the run in trackers (default: the recipe's name)."
    )


class OutputSection(Section):
    dir: str | None = Field(
        None,
        description="Run directory: resolved recipe, adapter or model, tokenizer, metrics. "
        "Default: runs/<name>. Relative paths are relative to the current directory.",
    )


class Recipe(Section):
    """A whole fine-tuning run."""

    name: str = Field(
        "run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name, used in the default output dir (default: the recipe file's name).",
    )
    model: ModelSection = Field(description="The base model.")
    data: DataSection = Field(description="Training and evaluation data.")
    method: Method = Field(description="Training objective: {kind: sft} or {kind: dpo, ...}.")
    adapter: Adapter = Field(
        default_factory=lambda: LoraAdapter(kind="lora"), description="What is trained: full, lora or qlora."
    )
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimisation settings.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Multi-process settings."
    )
    logging: LoggingSection = Field(default_factory=LoggingSection, description="Metric reporting.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where the run is written.")

    @property
    def run_dir(self) -> str:
        """Where this run writes everything."""
        return self.output.dir or f"runs/{self.name}"

    @model_validator(mode="after")
    def _check_cross_section(self) -> Recipe:
        datasets = [("train", i, d) for i, d in enumerate(self.data.train)]
        datasets += [("eval", i, d) for i, d in enumerate(self.data.eval)]
        dpo = self.method.kind == "dpo"
        rules = [
            (
                dpo != (d.format == "preference"),
                f"data.{split}.{i}.format",
                f"is '{d.format}', but method.kind is '{self.method.kind}'; "
                + (
                    "DPO trains on preference pairs: use format: preference with prompt/chosen/rejected rows"
                    if dpo
                    else "SFT cannot train on preference pairs: use method.kind: dpo, or format: messages"
                ),
            )
            for split, i, d in datasets
        ]
        rules.append(
            (
                bool(self.training.eval_steps) and not self.data.eval,
                "training.eval_steps",
                "is set but data.eval is empty; add data.eval datasets or remove eval_steps",
            )
        )
        rules += _speed_rules(self)
        check_rules(rules)
        return self


def _speed_rules(recipe: Recipe) -> list[tuple[bool, str, str]]:
    """training.batching / lm_head / token_metrics apply to SFT without packing, and fit together."""
    t, sft = recipe.training, recipe.method.kind == "sft"
    packing = sft and recipe.method.packing
    return [
        (t.batching != "auto" and (packing or not sft), "training.batching",
         f"is '{t.batching}', but " + ("method.packing already makes padding-free batches; leave batching at auto"
                                       if packing else "batching applies to SFT only; leave it at auto")),
        (t.lm_head != "auto" and not sft, "training.lm_head", "applies to SFT only; leave it at auto"),
        (t.token_metrics and not sft, "training.token_metrics", "applies to SFT only (DPO logs its own metrics)"),
        (t.token_metrics and t.lm_head == "full_logits", "training.token_metrics",
         "token metrics come from TRL's chunked LM head; set training.lm_head to chunked or auto"),
    ]
