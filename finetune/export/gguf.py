"""`finetune export --format gguf`: one GGUF file for llama.cpp/Ollama, merging an adapter first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from finetune.errors import UserError
from finetune.logs import stderr


def export_gguf(source: Path, *, quant: str = "f16", out: Path | None = None, log=None) -> Path:
    """Write one GGUF file; a run or adapter is merged (and verified) first, or its merge is reused."""
    from finetune.export.gguf_writer import QUANTS, write_gguf

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
    from finetune.merge.bake import run_merge

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
