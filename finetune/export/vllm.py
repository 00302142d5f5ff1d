"""`finetune export --format vllm`: the `vllm serve` command that hot-swaps a run's adapter, or a refusal.

vLLM loads a PEFT LoRA adapter only within its documented limits (vllm/lora/peft_helper.py,
PEFTHelper.validate_legal, and LoRAConfig.max_lora_rank, as of vLLM 0.11-0.12): kept here as data,
so a command is printed only for an adapter vLLM will load, and anything else gets a non-zero exit
saying what to do instead.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

# vLLM's LoRAConfig.max_lora_rank accepts these values only (default 16)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
# What vLLM refuses in adapter_config.json, with what to do instead. Each rule: (test on the config, reason).
MERGE = "merge it (`finetune merge RUN`) and serve the merged model: `vllm serve RUN/merged`"
RULES = (
    (lambda c: str(c.get("peft_type", "LORA")).upper() != "LORA",
     "vLLM serves LoRA adapters only; this one is {peft_type}. For AdaLoRA or IA3, " + MERGE +
     ". Prompt and prefix tuning cannot be merged: use `finetune chat`/`generate` or PEFT, or train a LoRA"),
    (lambda c: bool(c.get("use_dora")), "vLLM does not support DoRA adapters; " + MERGE),
    (lambda c: bool(c.get("modules_to_save")),
     "vLLM only loads adapters without modules_to_save (this one trains {modules_to_save} in full, e.g. for tokens "
     "added in training); " + MERGE + ", or train without adapter.modules_to_save"),
    (lambda c: c.get("bias", "none") != "none", "vLLM does not load adapter biases (bias: {bias}); " + MERGE),
    (lambda c: bool(c.get("trainable_token_indices")),
     "this adapter trains token embeddings (trainable_token_indices), which most vLLM versions refuse; " + MERGE),
    (lambda c: _rank(c) > MAX_LORA_RANKS[-1],
     f"rank {{r}} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]}); " + MERGE),
)


@dataclass
class _Served:
    """What to serve: the base model, and the adapter on it (None for a complete model)."""

    base: str
    adapter_dir: Path | None
    name: str
    init: str | None = None  # adapter.init of the run, when known (LoftQ adapters belong to a 4-bit base)


def vllm_command(source: Path, *, name: str | None = None) -> str:
    """The `vllm serve` command for this run, adapter or model; a UserError if vLLM would not load it."""
    served = _locate(source)
    if served.adapter_dir is None:
        return f"vllm serve {shlex.quote(served.base)}"
    adapter_dir = served.adapter_dir
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    problem = vllm_refusal(config)
    if served.init == "loftq":
        problem = ("a LoftQ adapter carries the 4-bit quantisation error of its base and is only right on that "
                   "4-bit base; vLLM would apply it to the full-precision base. Train with adapter.init: default")
    if problem:
        raise UserError(f"{source}: vLLM will not serve this adapter: {problem}")
    parts = [
        "vllm serve", shlex.quote(served.base), "--enable-lora",
        "--lora-modules", shlex.quote(f"{name or served.name}={adapter_dir.resolve()}"),
    ]
    rank = _rank(config)
    if rank > DEFAULT_MAX_LORA_RANK:
        parts += ["--max-lora-rank", str(next(r for r in MAX_LORA_RANKS if r >= rank))]
    template = adapter_dir / "chat_template.jinja"
    if template.is_file() and _read_template(Path(served.base)) != template.read_text(encoding="utf-8"):
        # vLLM formats chats with the base's template unless told; the adapter learnt this one
        parts += ["--chat-template", shlex.quote(str(template.resolve()))]
    return " ".join(parts)


def vllm_refusal(config: dict) -> str | None:
    """Why vLLM would refuse an adapter with this adapter_config.json (and what to do), or None."""
    values = {**config, "peft_type": config.get("peft_type", "LORA"), "r": _rank(config)}
    for test, reason in RULES:
        if test(config):
            return reason.format(**values)
    return None


def _rank(config: dict) -> int:
    """The largest rank of the adapter (its r, or a larger one in rank_pattern), as vLLM compares it."""
    return max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])


def _read_template(base: Path) -> str | None:
    """The base's own chat template, if the base is a local directory (a Hub id cannot be read offline)."""
    if (base / "chat_template.jinja").is_file():
        return (base / "chat_template.jinja").read_text(encoding="utf-8")
    config = base / "tokenizer_config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    return None


def _locate(source: Path) -> _Served:
    """The base and adapter behind a run (a chained run's adapter sits on the first run's base), adapter or model."""
    from finetune.inference.load import adapter_name
    from finetune.run.layout import RunDir

    if not source.exists():
        raise UserError(f"{source}: no such run or adapter directory")
    run = RunDir.at(source)
    if run.exists():
        from finetune.model.start import adapter_base

        recipe = run.read_recipe()
        if recipe.adapter.kind == "full":
            return _Served(str(run.model.resolve()), None, recipe.name)
        if not (run.adapter / "adapter_config.json").is_file():
            raise UserError(f"{source}: no adapter in {run.adapter}; did the run finish?")
        init = getattr(recipe.adapter, "init", None)
        return _Served(adapter_base(recipe).base, run.adapter, adapter_name(recipe.name), init)
    if (source / "adapter_config.json").is_file():
        base = json.loads((source / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{source}/adapter_config.json: base_model_name_or_path is not set; cannot find the base")
        return _Served(base, source, adapter_name(source.name))
    if (source / "config.json").is_file():
        return _Served(str(source.resolve()), None, source.name)
    raise UserError(f"{source}: not a run, model or adapter directory")
