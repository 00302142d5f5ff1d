"""`finetune export --format gguf`: one GGUF file for llama.cpp/Ollama, merging an adapter first.

The file records what it was made from (run.records.GGUF_SOURCE_*: the sha256 of the adapter, or of
the model directory), and a run's `merged/` is reused only while it was made from the run's
current adapter: a stale one is merged again, never exported silently.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from finetune.errors import UserError
from finetune.logs import stderr


def export_gguf(source: str | Path, *, quant: str = "f16", out: Path | None = None, log=None) -> Path:
    """Write one GGUF file; a run or adapter is merged (and verified) first, or its fresh merge is reused."""
    from finetune.export.gguf_writer import QUANTS, write_gguf
    from finetune.run.records import GGUF_SOURCE_PATH, GGUF_SOURCE_SHA256

    log = log or stderr
    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            "--format gguf needs the gguf package, which is not installed: pip install 'finetune-recipes[gguf]'"
        )
    if quant not in QUANTS:
        raise UserError(f"--quant: expected one of {', '.join(QUANTS)}, found {quant!r}")
    model_dir, default_out, origin, digest = _model_to_export(source, quant, log)
    out = out or default_out
    if out.exists():
        raise UserError(f"--out: {out} already exists; choose another --out or remove it (nothing was written)")
    log(f"writing {out} ({quant}) from {model_dir}")
    tmp = out.with_name(f".{out.name}.tmp")  # renamed into place when complete: no half file under the real name
    try:
        result = write_gguf(model_dir, tmp, quant=quant,
                            metadata={GGUF_SOURCE_SHA256: digest, GGUF_SOURCE_PATH: str(origin.resolve())})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size / 2**20
    log(f"wrote {out}: {result.architecture}, {result.tensors} tensors, {quant}, {size:.1f} MiB; made from {origin} "
        f"(sha256 {digest[:12]})")
    log(f"try: llama-cli -m {out} -cnv   (or an Ollama Modelfile with FROM {out})")
    return out


def _model_to_export(source: str | Path, quant: str, log) -> tuple[Path, Path, Path, str]:
    """(complete model directory, default GGUF path, what it was made from, that origin's sha256)."""
    from finetune.run.layout import MergedDir
    from finetune.run.records import content_sha256, read_merge_report
    from finetune.run.resolve import resolve

    found = resolve(str(source), local=True)
    if found.adapter is None:  # a complete model: a full fine-tuning run, a merge, a model directory
        model_dir = Path(found.weights)
        if found.kind == "merged":
            report = read_merge_report(MergedDir(model_dir))
            origin, digest = Path(report.adapter), report.adapter_sha256 or content_sha256(model_dir)
        else:
            origin, digest = model_dir, content_sha256(model_dir)
        stem = found.run.name if found.kind == "run" else model_dir.name
        default = found.run.gguf(quant) if found.kind == "run" else model_dir.parent / f"{stem}-{quant}.gguf"
        return model_dir, default, origin, digest
    digest = content_sha256(found.adapter)
    if found.kind == "run":
        merged = found.run.merged
        report = read_merge_report(merged) if merged.exists() else None
        if report is not None and report.adapter_sha256 == digest:
            log(f"using the merged model in {merged.root} (made from this run's adapter, sha256 {digest[:12]})")
            return merged.root, found.run.gguf(quant), found.adapter, digest
        if report is not None and report.adapter_sha256 is None:
            log(f"{merged.root} does not record which adapter it was made from (an older finetune): merging again")
        elif report is not None:
            log(f"{merged.root} was merged from an earlier adapter (sha256 {report.adapter_sha256[:12]}, now "
                f"{digest[:12]}): merging again")
        else:
            log(f"{source} holds an adapter: merging it into its base first")
        from finetune.merge.bake import run_merge

        return run_merge(source, overwrite=True, log=log), found.run.gguf(quant), found.adapter, digest
    from finetune.merge.bake import run_merge

    log(f"{source} is an adapter: merging it into its base first")
    merged_dir = run_merge(source, log=log)
    return merged_dir, merged_dir.parent / f"{merged_dir.name}-{quant}.gguf", found.adapter, digest
