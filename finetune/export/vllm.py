"""`finetune export --format vllm`: the `vllm serve` command that hot-swaps a run's adapter."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from finetune.errors import UserError
from finetune.logs import stderr


def vllm_command(source: str | Path, *, name: str | None = None) -> str:
    """The `vllm serve` command that serves the base with this adapter hot-swappable as `name`.

    For a run that continued an earlier run's adapter the base is the true base of the chain
    (finetune.run.resolve); for one trained on an earlier run's merge, that merge.
    """
    from finetune.inference.load import resolve_source

    resolved = resolve_source(str(source))
    base = str(Path(resolved.base).resolve()) if Path(resolved.base).is_dir() else resolved.base  # vllm's own cwd
    if not resolved.adapters:
        return f"vllm serve {shlex.quote(base)}"
    [(default_name, adapter_dir)] = resolved.adapters
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"{adapter_dir}: vLLM serves LoRA adapters only; this one is {config.get('peft_type')}")
    if config.get("use_dora"):
        raise UserError(f"{adapter_dir}: vLLM does not serve DoRA adapters; merge it (`finetune merge`) and serve that")
    parts = [
        "vllm serve", shlex.quote(base), "--enable-lora",
        "--lora-modules", shlex.quote(f"{name or default_name}={adapter_dir.resolve()}"),
    ]
    rank = int(config.get("r", 16))
    if rank > 16:  # vLLM's default --max-lora-rank is 16 and it refuses larger adapters
        parts += ["--max-lora-rank", str(_next_supported_rank(rank))]
    if config.get("modules_to_save"):
        stderr(
            f"note: {adapter_dir} also trains {config['modules_to_save']} in full; vLLM's LoRA serving does not "
            "load those, so merge the adapter (`finetune merge`) and serve the merged model instead"
        )
    return " ".join(parts)


def _next_supported_rank(rank: int) -> int:
    for supported in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= supported:
            return supported
    return rank
