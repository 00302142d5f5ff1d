"""`finetune export`: ship a trained model to llama.cpp/Ollama (GGUF) or to vLLM (adapter hot-swap)."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

from finetune.errors import UserError
from finetune.logs import stderr

FORMATS = ("gguf", "vllm")


def export_gguf(source: Path, *, quant: str = "f16", out: Path | None = None, log=None) -> Path:
    """Write one GGUF file; a run or adapter is merged (and verified) first, or its merge is reused."""
    from finetune.gguf_export import QUANTS, write_gguf

    log = log or stderr
    if importlib.util.find_spec("gguf") is None:
        raise UserError("--format gguf needs the gguf package, which is not installed: pip install 'finetune[gguf]'")
    if quant not in QUANTS:
        raise UserError(f"--quant: expected one of {', '.join(QUANTS)}, found {quant!r}")
    model_dir, stem = _merged_model_dir(source, log)
    out = out or model_dir.parent / f"{stem}-{quant}.gguf"
    if out.exists():
        raise UserError(f"--out: {out} already exists; choose another --out or remove it (nothing was written)")
    log(f"writing {out} ({quant}) from {model_dir}")
    result = write_gguf(model_dir, out, quant=quant)
    size = out.stat().st_size / 2**20
    log(f"wrote {out}: {result.architecture}, {result.tensors} tensors, {quant}, {size:.1f} MiB")
    log(f"try: llama-cli -m {out} -cnv   (or an Ollama Modelfile with FROM {out})")
    return out


def _merged_model_dir(source: Path, log) -> tuple[Path, str]:
    """A directory with a complete transformers model for `source`, merging an adapter if needed."""
    from finetune.merge import run_merge

    if not source.exists():
        raise UserError(f"{source}: no such run, model or adapter directory")
    if (source / "recipe.yaml").is_file():
        if (source / "model" / "config.json").is_file():  # full fine-tuning
            return source / "model", source.name
        merged = source / "merged"
        if (merged / "merge_report.json").is_file():
            log(f"using the merged model in {merged} (from an earlier `finetune merge`)")
            return merged, source.name
        log(f"{source} holds an adapter: merging it into its base first")
        return run_merge(source, log=log), source.name
    if (source / "adapter_config.json").is_file():
        log(f"{source} is an adapter: merging it into its base first")
        merged = run_merge(source, log=log)
        return merged, merged.name
    if (source / "config.json").is_file():
        return source, source.name
    raise UserError(
        f"{source}: not a run, model or adapter directory (no recipe.yaml, config.json or adapter_config.json)"
    )


def vllm_command(source: Path, *, name: str | None = None) -> str:
    """The `vllm serve` command that serves the base with this adapter hot-swappable as `name`."""
    from finetune.inference import resolve_source

    resolved = resolve_source(str(source))
    if not resolved.adapters:
        model = resolved.base
        return f"vllm serve {shlex.quote(model)}"
    [(default_name, adapter_dir)] = resolved.adapters
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"{adapter_dir}: vLLM serves LoRA adapters only; this one is {config.get('peft_type')}")
    if config.get("use_dora"):
        raise UserError(f"{adapter_dir}: vLLM does not serve DoRA adapters; merge it (`finetune merge`) and serve that")
    parts = [
        "vllm serve", shlex.quote(resolved.base), "--enable-lora",
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
