"""The files a launch runs with: a DeepSpeed JSON and an accelerate config, generated or a shipped preset.

The recipe's `distributed` section is the only input. Batch sizes, learning rate, precision and
gradient clipping stay "auto" in the DeepSpeed JSON: the Trainer fills them in from the recipe's
`training` section, so neither side can contradict the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError
from finetune.recipe.schema import DistributedSection

TYPE_OF_STRATEGY = {"ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED", "fsdp": "FSDP"}
# a named accelerate file may be a DDP or an FSDP config; for DeepSpeed the recipe names the JSON itself
STRATEGY_OF_YAML = {"MULTI_GPU": "ddp", "FSDP": "fsdp"}


def configs_dir() -> Path:
    """The shipped presets: finetune/resources/launch/ (installed with the package)."""
    return Path(__file__).resolve().parent.parent / "resources" / "launch"


def named_configs() -> dict[str, Path]:
    """Name -> file for every shipped preset: deepspeed/*.json and accelerate/*.yaml under configs_dir()."""
    root = configs_dir()
    files = sorted(root.glob("deepspeed/*.json")) + sorted(root.glob("accelerate/*.yaml"))
    return {path.stem: path for path in files}


@dataclass(frozen=True)
class NamedConfig:
    """A config file a recipe names with `distributed.config`, parsed."""

    path: Path
    kind: str  # "deepspeed" for a DeepSpeed JSON, else the strategy of an accelerate YAML's distributed_type
    data: dict[str, Any]


def read_named_config(value: str) -> NamedConfig | None:
    """The file `distributed.config` names (a shipped name or a path), or None when there is none."""
    path = named_configs().get(value) or Path(value)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"distributed.config: {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"distributed.config: {path} must hold a mapping, found {type(data).__name__}")
    if path.suffix == ".json":
        return NamedConfig(path, "deepspeed", data)
    kind = str(data.get("distributed_type"))
    return NamedConfig(path, STRATEGY_OF_YAML.get(kind, f"accelerate distributed_type {kind}"), data)


def deepspeed_config(stage: int, *, offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, Any]:
    """A DeepSpeed JSON for one ZeRO stage; everything the recipe's training section decides is "auto".

    `train_batch_size` is left out on purpose: under ZeRO-3 a fixed value breaks `zero.Init` when it
    runs before the process group exists, and DeepSpeed derives it from the other two anyway.
    """
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    zero["reduce_bucket_size"] = "auto"
    if stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,  # the final save writes whole weights
        }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if offload_optimizer:
        # Offloaded states step on the CPU; DeepSpeed's own CPU Adam does that fast (a torch
        # optimizer there is refused by DeepSpeed unless forced, and is several times slower).
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def fsdp_config(
    sharding: str = "full_shard", auto_wrap: str = "transformer_layer", min_params: int | None = None,
    offload_params: bool = False,
) -> dict[str, Any]:
    """accelerate's fsdp_config block for FSDP2."""
    config: dict[str, Any] = {
        "fsdp_version": 2,
        "fsdp_reshard_after_forward": sharding == "full_shard",
        # no layer class list: accelerate then wraps the model's own `_no_split_modules` classes
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if auto_wrap == "transformer_layer" else "SIZE_BASED_WRAP",
        "fsdp_offload_params": offload_params,
        "fsdp_state_dict_type": "FULL_STATE_DICT",  # the final save writes whole weights, as one process would
        "fsdp_cpu_ram_efficient_loading": True,  # weights are read once (process 0) and broadcast
        "fsdp_sync_module_states": True,
        "fsdp_activation_checkpointing": False,  # training.gradient_checkpointing decides, through the Trainer
    }
    if auto_wrap == "size":
        config["fsdp_min_num_params"] = min_params or 100_000_000
    return config


def generated_deepspeed(dist: DistributedSection, named: NamedConfig | None) -> dict[str, Any] | None:
    """The DeepSpeed JSON this run uses: the named file as it is, or one generated from the recipe."""
    if dist.strategy != "deepspeed":
        return None
    if named is not None:
        return named.data
    assert dist.zero_stage is not None  # the schema requires zero_stage or config
    return deepspeed_config(
        dist.zero_stage, offload_optimizer=dist.offload_optimizer, offload_params=dist.offload_params
    )


def recipe_owned_values(dist: DistributedSection, processes: int) -> dict[str, Any]:
    """The accelerate keys that come from the recipe: the process and machine layout.

    Not `rdzv_backend` or `same_network`: accelerate 1.15 ignores both in a config file (its
    command-line defaults win), so the rendezvous backend goes on the command line instead.

    No `mixed_precision`: the Trainer takes it from the recipe's training.precision (bf16/fp16 flags),
    and a value here would override its "no" (transformers reads ACCELERATE_MIXED_PRECISION).
    """
    values: dict[str, Any] = {
        "num_processes": processes * dist.num_machines,  # accelerate counts all machines together
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "main_process_port": dist.main_port,
    }
    if dist.num_machines > 1:
        values["main_process_ip"] = dist.main_address
    return values


def accelerate_config(
    dist: DistributedSection, processes: int, named: NamedConfig | None, deepspeed_file: Path | None,
    zero_stage: int | None,
) -> dict[str, Any]:
    """The accelerate config YAML for `accelerate launch --config_file`."""
    config: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "debug": False}
    if named is not None and named.kind != "deepspeed":
        config |= named.data
    config |= {"distributed_type": TYPE_OF_STRATEGY[dist.strategy], "use_cpu": False, "gpu_ids": "all"}
    config |= recipe_owned_values(dist, processes)
    if dist.strategy == "deepspeed":
        assert deepspeed_file is not None
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_file),
            "zero3_init_flag": zero_stage == 3,  # load weights straight into their shards
            # "standard" starts the processes of this machine only (torch elastic); the default
            # multi-node launcher, pdsh, would ssh into hosts from a hostfile instead
            "deepspeed_multinode_launcher": "standard",
        }
    elif dist.strategy == "fsdp" and named is None:
        config["fsdp_config"] = fsdp_config(
            dist.fsdp_sharding or "full_shard",
            dist.fsdp_auto_wrap or "transformer_layer",
            dist.fsdp_min_params,
            dist.offload_params,
        )
    return config
