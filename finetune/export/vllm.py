"""`finetune export --format vllm`: the `vllm serve` command that hot-swaps a run's adapter, or a refusal.

vLLM loads a PEFT LoRA adapter only within its documented limits (vllm/lora/peft_helper.py,
PEFTHelper.validate_legal, and LoRAConfig.max_lora_rank, as of vLLM 0.11-0.12): kept here as data,
so a command is printed only for an adapter vLLM will load, and anything else gets a non-zero exit
saying what to do instead.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from finetune.errors import UserError
from finetune.run.layout import ADAPTER_CONFIG

# vLLM's LoRAConfig.max_lora_rank accepts these values only (default 16)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
# What vLLM refuses in adapter_config.json, with what to do instead. Each rule: (test on the config, reason);
# {source} is what the user exported and {merged} where `finetune merge {source}` writes by default.
MERGE = "merge it (`finetune merge {source}`) and serve the merged model: `vllm serve {merged}`"
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
RULES = (
    (lambda c: str(c.get("peft_type", "LORA")).upper() in PROMPT_LEARNING,
     "vLLM serves LoRA adapters only; this one is {peft_type}, which cannot be merged either: use "
     "`finetune chat {source}` or `finetune generate {source}` (or PEFT), or train a LoRA"),
    (lambda c: str(c.get("peft_type", "LORA")).upper() != "LORA",
     "vLLM serves LoRA adapters only; this one is {peft_type}: " + MERGE),
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


def vllm_command(source: str | Path, *, name: str | None = None) -> str:
    """The `vllm serve` command for this run, adapter or model; a UserError if vLLM would not load it.

    For a run that continued an earlier run's adapter the base is the true base of the chain
    (finetune.run.resolve); for one trained on an earlier run's merge, that merge.
    """
    from finetune.inference.load import resolve_source

    resolved = resolve_source(str(source))
    base = str(Path(resolved.base).resolve()) if Path(resolved.base).is_dir() else resolved.base  # vllm's own cwd
    if not resolved.adapters:
        return f"vllm serve {shlex.quote(base)}"
    [(default_name, adapter_dir)] = resolved.adapters
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    problem = vllm_refusal(config, source=str(source), merged=str(_merged_dir(source, resolved.run_dir)))
    if getattr(getattr(resolved.recipe, "adapter", None), "init", None) == "loftq":
        problem = ("a LoftQ adapter carries the 4-bit quantisation error of its base and is only right on that "
                   "4-bit base; vLLM would apply it to the full-precision base. Train with adapter.init: default")
    if problem:
        raise UserError(f"{source}: vLLM will not serve this adapter: {problem}")
    parts = [
        "vllm serve", shlex.quote(base), "--enable-lora",
        "--lora-modules", shlex.quote(f"{name or default_name}={adapter_dir.resolve()}"),
    ]
    rank = _rank(config)
    if rank > DEFAULT_MAX_LORA_RANK:
        parts += ["--max-lora-rank", str(next(r for r in MAX_LORA_RANKS if r >= rank))]
    template = adapter_dir / "chat_template.jinja"
    if template.is_file() and _read_template(Path(base)) != template.read_text(encoding="utf-8"):
        # vLLM formats chats with the base's template unless told; the adapter learnt this one
        parts += ["--chat-template", shlex.quote(str(template.resolve()))]
    return " ".join(parts)


def vllm_refusal(config: dict, *, source: str = "RUN", merged: str = "RUN/merged") -> str | None:
    """Why vLLM would refuse an adapter with this adapter_config.json (and what to do), or None."""
    values = {**config, "peft_type": config.get("peft_type", "LORA"), "r": _rank(config), "source": source,
              "merged": merged}
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


def _merged_dir(source: str | Path, run_dir: Path | None) -> Path:
    """Where `finetune merge source` writes by default: <run>/merged for a run, else <source>-merged beside it."""
    from finetune.run.layout import RunDir

    path = Path(source)
    if run_dir is not None and path.resolve() in (run_dir.resolve(), RunDir(run_dir).adapter.resolve()):
        return RunDir(run_dir).merged.root
    return path.with_name(path.name + "-merged")
