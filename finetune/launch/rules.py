"""Combinations refused before any process starts, kept as data: one row per rule.

Each rule names the recipe key to change, says why the combination cannot work, and how to fix it.
Rules about one section's own fields (zero_stage without deepspeed, machine_rank out of range) live
on the schema and are caught by `finetune validate`; these need the machine or several sections.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from finetune.errors import UserError
from finetune.launch.configs import (
    NamedConfig,
    configs_dir,
    generated_deepspeed,
    named_configs,
    read_named_config,
    recipe_owned_values,
)
from finetune.recipe.schema import Recipe


@dataclass(frozen=True)
class Machine:
    """What this machine offers the launch."""

    gpus: int
    cpus: int
    deepspeed_installed: bool

    @classmethod
    def detect(cls) -> Machine:
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        installed = importlib.util.find_spec("deepspeed") is not None
        return cls(gpus=torch.cuda.device_count(), cpus=cpus, deepspeed_installed=installed)


@dataclass
class Context:
    """Everything a rule looks at: the recipe, the machine, and the config files the recipe implies."""

    recipe: Recipe
    machine: Machine

    @property
    def d(self):
        return self.recipe.distributed

    @cached_property
    def named(self) -> NamedConfig | None:
        return read_named_config(self.d.config) if self.d.config else None

    @property
    def names(self) -> str:
        return ", ".join(sorted(named_configs())) or f"none found in {configs_dir()}"

    @property
    def processes(self) -> int | None:
        """Processes per machine, or None while `auto` cannot be resolved (no GPU)."""
        if self.d.strategy == "none":
            return 1
        if self.d.num_processes == "auto":
            return self.machine.gpus or None
        return self.d.num_processes

    @property
    def world(self) -> int:
        return (self.processes or 1) * self.d.num_machines

    @cached_property
    def ds(self) -> dict[str, Any] | None:
        """The DeepSpeed JSON the run would use (None without DeepSpeed or with a missing file)."""
        if self.d.config and (self.named is None or self.named.kind != "deepspeed"):
            return None
        return generated_deepspeed(self.d, self.named)

    @property
    def zero_stage(self) -> int | None:
        return (self.ds or {}).get("zero_optimization", {}).get("stage")

    @property
    def sharded_by(self) -> str | None:
        """What shards the weights across processes, if anything does."""
        return "DeepSpeed ZeRO-3" if self.zero_stage == 3 else "FSDP" if self.d.strategy == "fsdp" else None

    @property
    def global_batch(self) -> int:
        t = self.recipe.training
        return t.micro_batch_size * t.gradient_accumulation_steps * self.world

    @property
    def batch_conflicts(self) -> str:
        """DeepSpeed batch settings that disagree with the recipe (DeepSpeed would assert mid-start)."""
        if not self.ds:
            return ""
        t = self.recipe.training
        wanted = {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "train_batch_size": self.global_batch,
        }
        return ", ".join(
            f"{key} {self.ds[key]} (recipe: {value})"
            for key, value in wanted.items()
            if isinstance(self.ds.get(key), int) and self.ds[key] != value
        )

    @property
    def training_conflicts(self) -> str:
        """Other numbers a DeepSpeed JSON fixes that the recipe's training section also sets."""
        if not self.ds:
            return ""
        t, params = self.recipe.training, (self.ds.get("optimizer") or {}).get("params") or {}
        pairs = [
            ("gradient_clipping", self.ds.get("gradient_clipping"), "max_grad_norm", t.max_grad_norm),
            ("optimizer.params.lr", params.get("lr"), "learning_rate", t.learning_rate),
            ("optimizer.params.weight_decay", params.get("weight_decay"), "weight_decay", t.weight_decay),
        ]
        return ", ".join(
            f"{key} {value} (training.{field}: {wanted})"
            for key, value, field, wanted in pairs
            if isinstance(value, int | float) and not isinstance(value, bool) and value != wanted
        )

    @property
    def topology_conflicts(self) -> str:
        """Keys of a named accelerate file that the recipe decides, set to other values."""
        if self.named is None or self.named.kind == "deepspeed" or self.processes is None:
            return ""
        # precision comes from training.precision; accelerate's value would override the Trainer's
        owned = recipe_owned_values(self.d, self.processes) | {"mixed_precision": "no"}
        return ", ".join(
            f"{key}: {self.named.data[key]!r} (recipe: {value!r})"
            for key, value in owned.items()
            if key in self.named.data and self.named.data[key] != value
        )


@dataclass(frozen=True)
class Rule:
    """A refused combination: `broken(ctx)` says whether it applies; `reason` and `fix` are format strings.

    `local` rules are about the machine this command runs on (its GPUs, cores, packages): they refuse a
    launch here, but only warn in `finetune launch-plan`, which may plan on a login node for other machines.
    """

    key: str
    broken: Callable[[Context], bool]
    reason: str
    fix: str
    local: bool = False


ADAMW = ("adamw_torch", "adamw_torch_fused")

RULES = [
    Rule(
        "distributed.strategy",
        lambda c: c.d.strategy == "deepspeed" and not c.machine.deepspeed_installed,
        "strategy 'deepspeed' needs the deepspeed package, which is not installed",
        "pip install 'finetune-recipes[deepspeed]'",
        local=True,
    ),
    Rule(
        "distributed.strategy",
        lambda c: c.d.strategy == "fsdp" and c.machine.gpus == 0,
        "FSDP through accelerate and the Trainer needs GPUs and this machine has none "
        "(on a CPU it falls back to plain DDP or fails)",
        "run on a GPU machine, or use strategy: ddp or deepspeed (both run on CPUs with gloo)",
        local=True,
    ),
    Rule(
        "distributed.num_processes",
        lambda c: c.d.strategy != "none" and c.d.num_processes == "auto" and c.machine.gpus == 0,
        "'auto' starts one process per GPU and this machine has none",
        "set distributed.num_processes to a number; on this CPU at most {c.machine.cpus} (one per core)",
    ),
    Rule(
        "distributed.num_processes",
        lambda c: c.machine.gpus > 0 and (c.processes or 0) > c.machine.gpus,
        "{c.processes} processes per machine, but {c.machine.gpus} GPU(s) are visible; processes sharing a GPU "
        "share its memory, and NCCL refuses two ranks on one device",
        "set num_processes to at most {c.machine.gpus} (or auto), or make more GPUs visible (CUDA_VISIBLE_DEVICES)",
        local=True,
    ),
    Rule(
        "distributed.num_processes",
        lambda c: c.machine.gpus == 0 and (c.processes or 0) > c.machine.cpus,
        "{c.processes} CPU processes, but this machine has {c.machine.cpus} core(s); each gloo process computes on "
        "one core, so more processes than cores only take turns and run slower",
        "set num_processes to at most {c.machine.cpus}",
        local=True,
    ),
    Rule(
        "distributed.config",
        lambda c: bool(c.d.config) and c.named is None,
        "no config named '{c.d.config}' (shipped: {c.names}), and no such file",
        "use one of the names above, or a path to a DeepSpeed .json or accelerate .yaml file",
    ),
    Rule(
        "distributed.config",
        lambda c: c.named is not None and c.named.kind != c.d.strategy,
        "{c.named.path} is a config for {c.named.kind}, but strategy is '{c.d.strategy}' (an accelerate file "
        "may be an FSDP or MULTI_GPU config; for DeepSpeed name the JSON itself)",
        "set distributed.strategy to match the file, or name a config for '{c.d.strategy}'",
    ),
    Rule(
        "distributed.config",
        lambda c: bool(c.topology_conflicts),
        "{c.named.path} sets {c.topology_conflicts}, which the recipe's distributed section decides",
        "remove those keys from the file (the recipe fills them in), or set the same values in the recipe",
    ),
    Rule(
        "training.micro_batch_size",
        lambda c: bool(c.batch_conflicts),
        "the DeepSpeed config fixes {c.batch_conflicts}; DeepSpeed requires train_batch_size = micro batch x "
        "gradient accumulation x {c.world} processes = {c.global_batch}, and would stop after every process started",
        'set those keys to "auto" in the DeepSpeed JSON (the recipe\'s training section then decides them), '
        "or change training.micro_batch_size / gradient_accumulation_steps to match",
    ),
    Rule(
        "distributed.config",
        lambda c: bool(c.training_conflicts),
        "the DeepSpeed config fixes {c.training_conflicts}; the Trainer refuses such a mismatch, but only after "
        "every process has started and loaded the model",
        'set those keys to "auto" in the DeepSpeed JSON (the recipe then decides them), or make the recipe match',
    ),
    Rule(
        "training.optimizer",
        lambda c: "optimizer" in (c.ds or {}) and c.recipe.training.optimizer not in ADAMW,
        "the DeepSpeed config builds its own optimizer ({c.ds[optimizer][type]}; optimizer offload needs DeepSpeed's "
        "CPU Adam), so training.optimizer '{c.recipe.training.optimizer}' would be ignored",
        "use training.optimizer: adamw_torch, or turn off offload_optimizer (drop the optimizer section of a "
        "named JSON)",
    ),
    Rule(
        "adapter.kind",
        lambda c: c.recipe.adapter.kind == "adalora" and c.d.strategy in ("deepspeed", "fsdp"),
        "AdaLoRA's rank allocation and orthogonality penalty run outside {c.d.strategy}'s engine: they read whole "
        "parameters and gradients, which ZeRO/FSDP hold as shards (empty on most processes under ZeRO-3), and add "
        "a backward pass the engine does not reduce",
        "use distributed.strategy: ddp for AdaLoRA, or adapter.kind: lora with {c.d.strategy}",
    ),
    Rule(
        "adapter.quant_storage",
        lambda c: c.recipe.adapter.kind == "qlora" and c.sharded_by is not None
        and c.recipe.adapter.quant_storage != c.recipe.model.dtype,
        "QLoRA under {c.sharded_by} shards the packed 4-bit weights as flat tensors of the model's own float dtype; "
        "with adapter.quant_storage {c.recipe.adapter.quant_storage} and model.dtype {c.recipe.model.dtype} "
        "they cannot be sharded together",
        "set adapter.quant_storage and model.dtype to the same float dtype, e.g. both bfloat16 "
        "(name it: model.dtype auto is decided on each machine)",
    ),
]


def check_launch(ctx: Context, origins: dict | None = None, *, planning: bool = False) -> list[str]:
    """Raise one UserError listing every rule the run breaks; nothing has been started or written yet.

    With `planning`, rules about this machine (Rule.local) are returned as warnings instead.
    """
    from finetune.recipe.load import _origin

    problems, warnings = [], []
    for rule in RULES:
        if rule.broken(ctx):
            parts = tuple(rule.key.split("."))
            where = _origin(origins, parts) + ": " if origins else ""
            reason, fix = rule.reason.format(c=ctx), rule.fix.format(c=ctx)
            (warnings if planning and rule.local else problems).append(f"{where}{rule.key}: {reason}. Fix: {fix}")
    if problems:
        raise UserError(
            f"{len(problems)} problem{'s' if len(problems) > 1 else ''} with this launch; nothing was started",
            problems=problems,
        )
    return warnings
