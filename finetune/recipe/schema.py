"""The recipe schema: one pydantic model per section, unknown keys rejected.

Cross-field rules live on the section they guard and raise; they never rewrite a value.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


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
    add_special_tokens: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Special tokens to add to the tokenizer (e.g. ['<tool_call>', '</tool_call>']). The embeddings "
        "grow to fit; their new rows must be trained: list embed_tokens and lm_head in adapter.modules_to_save "
        "(or use adapter.kind: full). The tokenizer is saved with them.",
    )

    @model_validator(mode="after")
    def _check_tokens(self) -> ModelSection:
        repeated = sorted({t for t in self.add_special_tokens if self.add_special_tokens.count(t) > 1})
        check_rules([(bool(repeated), "add_special_tokens", f"lists {repeated} more than once")])
        return self


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


class TargetRegex(Section):
    regex: str = Field(
        min_length=1,
        description="Regular expression matched against whole module names (re.fullmatch), e.g. "
        "'model\\.layers\\.[0-3]\\.self_attn\\.[qv]_proj'.",
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"does not compile as a regular expression: {exc}") from None
        return value


class LayerRange(Section):
    first: NonNegativeInt = Field(description="First decoder layer to adapt (0-based).")
    last: NonNegativeInt = Field(description="Last decoder layer to adapt (inclusive).")

    @model_validator(mode="after")
    def _check_order(self) -> LayerRange:
        check_rules([(self.last < self.first, "last", f"is {self.last}, before first ({self.first})")])
        return self

    @property
    def indices(self) -> list[int]:
        return list(range(self.first, self.last + 1))


ModuleNames = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


def _shape(value) -> str:
    # Pick the union member by the value's shape, so a mistake gets that member's message alone.
    if isinstance(value, dict | BaseModel):
        return "mapping"
    return "string" if isinstance(value, str) else "list"


Targets = Annotated[
    Annotated[Literal["all-linear"], Tag("string")]
    | Annotated[ModuleNames, Tag("list")]
    | Annotated[TargetRegex, Tag("mapping")],
    Discriminator(_shape),
]
Trainable = Annotated[
    Annotated[ModuleNames, Tag("list")] | Annotated[TargetRegex, Tag("mapping")], Discriminator(_shape)
]
Layers = Annotated[
    Annotated[list[NonNegativeInt], Tag("list")] | Annotated[LayerRange, Tag("mapping")], Discriminator(_shape)
]


def check_target_string(value, *, all_linear: bool = True):
    """A bare string other than 'all-linear' is a common slip for a one-name list; say so."""
    choices = ("'all-linear', " if all_linear else "") + "a list of module names or {regex: PATTERN}"
    if isinstance(value, str) and not (all_linear and value == "all-linear"):
        raise ValueError(f"expected {choices}; write [{value}] for one module name")
    if not isinstance(value, str | list | dict | BaseModel):
        raise ValueError(f"expected {choices}")
    return value


class TargetFields(Section):
    target_modules: Targets = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every linear layer but the output head), a list of names "
        "(a name matches a module whose full name is it or ends in '.name', e.g. [q_proj, v_proj] or "
        "[layers.0.mlp.down_proj]), or {regex: PATTERN} matched against whole module names. Names that match "
        "nothing in the model stop the run before training.",
    )
    modules_to_save: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Modules trained in full next to the adapter and saved with it (e.g. [embed_tokens, lm_head] "
        "when model.add_special_tokens adds tokens).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _check_string(cls, value):
        return check_target_string(value)


class LayerFields(Section):
    layers: Layers | None = Field(
        None,
        description="Adapt the target modules of these decoder layers only: a list of 0-based indices "
        "([0, 1, 31]) or an inclusive range ({first: 0, last: 15}). Default: every layer.",
    )

    @property
    def layer_indices(self) -> list[int] | None:
        return self.layers.indices if isinstance(self.layers, LayerRange) else self.layers

    def _layer_rules(self) -> list[tuple[bool, str, str]]:
        return [
            (
                self.layers is not None and isinstance(self.target_modules, TargetRegex),
                "layers",
                "cannot narrow a regex target; put the layer indices into adapter.target_modules.regex",
            ),
            (
                self.layers is not None and self.target_modules == "all-linear",
                "layers",
                "cannot narrow 'all-linear' (PEFT refuses layer indices with it); list the module names in "
                "adapter.target_modules instead, e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
            ),
        ]


LoraInit = Literal["default", "gaussian", "pissa", "pissa_fast", "olora", "loftq"]
# Inits that rewrite the base weights; the saved adapter is converted back to plain LoRA on the original base.
MUTATING_INITS = ("pissa", "pissa_fast", "olora")


class LoraFields(LayerFields, TargetFields):
    r: PositiveInt = Field(16, le=4096, description="LoRA rank (1-4096).")
    alpha: float = Field(
        32, gt=0, le=65536, description="LoRA scaling numerator (scale = alpha / r, or / sqrt(r) with rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    init: LoraInit = Field(
        "default",
        description="Initial adapter weights: 'default' (A random, B zero: starts as the base), 'gaussian', "
        "'pissa' (principal singular vectors of each weight; SVD), 'pissa_fast' (randomised SVD, 16 iterations: "
        "minutes faster on large models), 'olora' (QR of each weight), 'loftq' (qlora only: starts from the "
        "4-bit quantisation error). PiSSA/OLoRA adapters are saved converted to plain LoRA on the original base.",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        ge=1,
        le=1024,
        description="LoRA+: train the B matrices at this multiple of training.learning_rate (1-1024; the paper "
        "uses 16). Default: off.",
    )

    @model_validator(mode="after")
    def _check_lora(self) -> LoraFields:
        check_rules(
            self._layer_rules()
            + [
                (
                    self.init in MUTATING_INITS and self.use_dora,
                    "init",
                    f"'{self.init}' cannot be combined with use_dora (its adapter cannot be converted back to the "
                    "original base); use init: default with DoRA",
                ),
                (
                    self.init in MUTATING_INITS and self.kind == "qlora",
                    "init",
                    f"'{self.init}' rewrites the base weights, which a 4-bit base cannot hold exactly; use kind: "
                    "lora for PiSSA/OLoRA, or init: loftq to start QLoRA from the quantisation error",
                ),
                (
                    self.init == "loftq" and self.kind != "qlora",
                    "init",
                    "'loftq' initialises the adapter from the 4-bit quantisation error, so it needs kind: qlora",
                ),
            ]
        )
        return self


class FullAdapter(Section):
    kind: Literal["full"] = Field(description="Train the weights of the model itself; no adapter.")
    trainable_modules: Trainable | None = Field(
        None,
        description="Train only these modules (and everything inside them) and freeze the rest: names matched as "
        "in target_modules (e.g. [embed_tokens, lm_head, layers.31]) or {regex: PATTERN}. Default: every weight.",
    )

    @field_validator("trainable_modules", mode="before")
    @classmethod
    def _check_string(cls, value):
        return None if value is None else check_target_string(value, all_linear=False)


class LoraAdapter(LoraFields):
    kind: Literal["lora"] = Field("lora", description="LoRA adapter on a frozen base in its dtype.")


class QLoraAdapter(LoraFields):
    kind: Literal["qlora"] = Field(description="LoRA on a 4-bit (bitsandbytes) quantised base.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )


class AdaLoraAdapter(LayerFields, TargetFields):
    kind: Literal["adalora"] = Field(
        description="AdaLoRA: SVD-shaped LoRA that moves rank between modules during training, by importance."
    )
    init_r: PositiveInt = Field(12, le=4096, description="Rank of every module at the start (1-4096).")
    target_r: PositiveInt = Field(8, le=4096, description="Average rank left per module at the end (<= init_r).")
    alpha: float = Field(16, gt=0, le=65536, description="Scaling numerator (as LoRA's alpha).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input, in [0, 1).")
    rank_warmup_ratio: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction of the run's total optimizer steps trained at init_r before ranks are pruned "
        "(PEFT's tinit, computed from the real step count).",
    )
    rank_final_ratio: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Fraction of the total steps at the end trained with the final ranks fixed (PEFT's tfinal; "
        "at least one step).",
    )
    rank_update_interval: PositiveInt = Field(
        1, le=10000, description="Re-allocate ranks every N optimizer steps during pruning (PEFT's deltaT)."
    )
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance (sensitivity) scores.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty.")
    orth_reg_weight: float = Field(
        0.5, ge=0, le=100, description="Weight of the penalty keeping the singular vectors orthogonal."
    )

    @model_validator(mode="after")
    def _check_adalora(self) -> AdaLoraAdapter:
        check_rules(
            self._layer_rules()
            + [
                (self.target_r > self.init_r, "target_r", f"is {self.target_r}, above init_r ({self.init_r})"),
                (
                    self.rank_warmup_ratio + self.rank_final_ratio >= 1,
                    "rank_final_ratio",
                    f"rank_warmup_ratio + rank_final_ratio is {self.rank_warmup_ratio + self.rank_final_ratio:g}; "
                    "it must stay below 1 to leave steps for pruning the ranks",
                ),
            ]
        )
        return self


class IA3Adapter(TargetFields):
    kind: Literal["ia3"] = Field(
        description="IA³: learned scaling vectors on the target modules (far fewer parameters than LoRA)."
    )
    target_modules: Targets = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="Modules whose activations are rescaled: 'all-linear', a list of names, or {regex: PATTERN} "
        "(default: the IA³ paper's keys, values and MLP output, as named in Llama/Qwen/Mistral models).",
    )
    feedforward_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["down_proj"],
        description="Target modules whose input (not output) is scaled, as in the paper's MLP; each must also "
        "be a target module.",
    )

    @model_validator(mode="after")
    def _check_ia3(self) -> IA3Adapter:
        names = self.target_modules if isinstance(self.target_modules, list) else None
        outside = [m for m in self.feedforward_modules if names is not None and m not in names]
        check_rules(
            [
                (
                    bool(outside),
                    "feedforward_modules",
                    f"{outside} are not in adapter.target_modules; every feedforward module must be a target",
                )
            ]
        )
        return self


class PromptTuningAdapter(Section):
    kind: Literal["prompt_tuning"] = Field(
        description="Prompt tuning: trained virtual-token embeddings put before every input; the model is frozen."
    )
    num_virtual_tokens: PositiveInt = Field(20, le=1024, description="Virtual tokens prepended (1-1024).")
    init: Literal["random", "text"] = Field(
        "random", description="Start the virtual tokens from random embeddings or from the embeddings of init_text."
    )
    init_text: str | None = Field(
        None, min_length=1, description="Text whose token embeddings start the virtual tokens (init: text)."
    )

    @model_validator(mode="after")
    def _check_init(self) -> PromptTuningAdapter:
        check_rules(
            [
                (self.init == "text" and not self.init_text, "init_text", "is required with init: text"),
                (
                    self.init == "random" and self.init_text is not None,
                    "init_text",
                    "is only used with init: text; set init: text or remove init_text",
                ),
            ]
        )
        return self


class PrefixTuningAdapter(Section):
    kind: Literal["prefix_tuning"] = Field(
        description="Prefix tuning: trained key/value prefixes in every attention layer; the model is frozen."
    )
    num_virtual_tokens: PositiveInt = Field(20, le=1024, description="Prefix length in tokens (1-1024).")
    prefix_projection: bool = Field(
        False, description="Produce the prefixes through a two-layer MLP (more parameters, often steadier)."
    )
    projection_hidden_size: PositiveInt | None = Field(
        None,
        le=65536,
        description="Hidden size of that MLP (default: the model's hidden size). Needs prefix_projection.",
    )

    @model_validator(mode="after")
    def _check_projection(self) -> PrefixTuningAdapter:
        check_rules(
            [
                (
                    self.projection_hidden_size is not None and not self.prefix_projection,
                    "projection_hidden_size",
                    "is only used with prefix_projection: true",
                )
            ]
        )
        return self


def _adapter_kind(value) -> str | None:
    # `adapter: {r: 8}` means LoRA, the section's default, rather than "kind is missing"
    if isinstance(value, dict):
        return value.get("kind", "lora")
    return getattr(value, "kind", None)


Adapter = Annotated[
    Annotated[FullAdapter, Tag("full")]
    | Annotated[LoraAdapter, Tag("lora")]
    | Annotated[QLoraAdapter, Tag("qlora")]
    | Annotated[AdaLoraAdapter, Tag("adalora")]
    | Annotated[IA3Adapter, Tag("ia3")]
    | Annotated[PromptTuningAdapter, Tag("prompt_tuning")]
    | Annotated[PrefixTuningAdapter, Tag("prefix_tuning")],
    Discriminator(_adapter_kind),
]
# Kinds whose adapter can be folded into the base weights (prompt/prefix tuning add inputs, not weights).
MERGEABLE_KINDS = ("lora", "qlora", "adalora", "ia3")

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
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = Field(
        "adamw_torch", description="Optimizer (adamw_8bit needs bitsandbytes)."
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
        default_factory=lambda: LoraAdapter(kind="lora"),
        description="What is trained: full, lora, qlora, adalora, ia3, prompt_tuning or prefix_tuning.",
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
        rules += _adapter_rules(self)
        rules.append(
            (
                bool(self.training.eval_steps) and not self.data.eval,
                "training.eval_steps",
                "is set but data.eval is empty; add data.eval datasets or remove eval_steps",
            )
        )
        check_rules(rules)
        return self


def _adapter_rules(recipe: Recipe) -> list[tuple[bool, str, str]]:
    """Rules between the adapter and other sections (each adapter kind checks its own fields)."""
    kind = recipe.adapter.kind
    prompt_learning = kind in ("prompt_tuning", "prefix_tuning")
    return [
        (
            kind == "prefix_tuning" and recipe.training.gradient_checkpointing,
            "training.gradient_checkpointing",
            "cannot be used with adapter.kind: prefix_tuning (the recomputed attention sees the prefix cache "
            "twice and fails); set it to false",
        ),
        (
            prompt_learning and bool(recipe.model.add_special_tokens),
            "model.add_special_tokens",
            f"adds tokens whose embeddings must be trained, but adapter.kind: {kind} freezes every model weight; "
            "use kind: lora with modules_to_save: [embed_tokens, lm_head], or kind: full",
        ),
    ]
