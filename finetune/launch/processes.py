"""Inside a launched run: which process writes, who prepares data first, how ZeRO-3 loads weights.

Outside a launch (one process) every helper here is a no-op, so train.py reads the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def is_launched() -> bool:
    """True in a process started by `accelerate launch` / torchrun (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """True in the process that writes files: the only one, or global rank 0 of a launched group."""
    return int(os.environ.get("RANK", "0")) == 0


def is_local_main_process() -> bool:
    """True in the first process of each machine (the one that prints for that machine)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


@contextmanager
def main_process_first() -> Iterator[None]:
    """Let the main process run the block first while the others wait, then the others.

    With a preprocessing cache the main process fills it and the others read it; without one they
    still cannot race each other writing the same files.
    """
    if not is_launched():
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


@contextmanager
def zero3_weight_loading() -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, make `from_pretrained` load each weight straight into its shard.

    transformers does so (deepspeed.zero.Init) only while a DeepSpeed config is registered, which
    normally happens when TrainingArguments are built; ours are built after the model, so register the
    launch's config for the load. Without it every process holds the whole model in host memory first.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        yield
        return
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = DeepSpeedPlugin()  # reads the JSON the launch points at (ACCELERATE_DEEPSPEED_CONFIG_FILE)
    if plugin.zero_stage != 3 or not plugin.zero3_init_flag:
        yield
        return
    plugin.set_deepspeed_weakref()  # keeps the registration alive as long as `plugin` lives
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
