"""The recipe schema: one pydantic model per section, unknown keys rejected.

Cross-field rules live on the section they guard and raise; they never rewrite a value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from finetune.recipe.preference import PREFERENCE_KINDS, DPOMethod, KTOMethod, ORPOMethod, preference_rules
from finetune.recipe.section import PositiveInt, RuleViolations, Section, check_rules

__all__ = ["Recipe", "RuleViolations", "Section", "check_rules", "DPOMethod", "KTOMethod", "ORPOMethod"]


class ModelSection(Section):
    path: str = Field(
        description="Base model: a local directory, a Hub id (org/name), 'builtin:tiny-llama' / "
        "'builtin:tiny-qwen3' for the offline tiny models, or the run directory of an earlier `finetune train` "
        "(e.g. runs/my-sft) to train on from its output (see start_from)."
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


# Fields of each row format that `columns` may rename; the optional ones may be absent from a row.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "system"),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "text": ("text",),
}
ChatRole = Literal["system", "user", "assistant"]


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
        description="Row shape: 'messages' (OpenAI chat: a list of {role, content}, optional 'system'), "
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
        description="Extra role names of messages/sharegpt rows and what they mean, e.g. {bot: assistant}. "
        "ShareGPT's human, gpt and system are known already.",
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
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="dtype the packed 4-bit weights are stored in. DeepSpeed ZeRO-3 and FSDP shard only "
        "floating-point tensors of one dtype: there set it to the dtype the model loads in (e.g. bfloat16).",
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
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = Field(
        "adamw_torch", description="Optimizer (adamw_8bit needs bitsandbytes)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for weights of new modules, shuffling and dropout.")
    logging_steps: PositiveInt = Field(10, description="Log metrics every N optimizer steps.")
    eval_steps: PositiveInt | None = Field(
        None, description="Evaluate every N steps (needs data.eval or data.eval_fraction)."
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
        description="Use a ready file instead of generating one: a name from configs/ (zero1, zero2, zero3, "
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
        default_factory=lambda: LoraAdapter(kind="lora"), description="What is trained: full, lora or qlora."
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
        check_rules(rules)
        return self
