"""`finetune export --format gguf`: one GGUF file for llama.cpp/Ollama, merging an adapter first.

Everything that can refuse the export (quant type, architecture, rope scaling, tokenizer) is
checked before an adapter is merged or a byte is written. The file records what it was made from
(run.records.GGUF_SOURCE_*: the sha256 of the adapter, or of the model directory), and a run's
`merged/` is reused only while it was made from the run's current adapter: a stale one is merged
again, never exported silently. The written file is then loaded in llama.cpp itself, when it is
installed, and must tokenise a prompt as transformers does.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.logs import stderr


@dataclass
class _Plan:
    """What the export reads: a complete model directory, or an adapter to merge first."""

    config: dict  # the model's config.json (for a merge: the base's)
    tokenizer_dir: Path
    name: str  # GGUF general.name: the run's name, else the directory's
    out: Path  # the default output file
    origin: Path  # what the file is made from: the adapter, or the model directory
    digest: str  # content_sha256 of `origin`
    model_dir: Path | None = None  # None: merge `source` first
    merge_note: str = ""  # why a merge is needed
    replace_merge: bool = False  # a run's merged/ is stale (or absent): the merge replaces it


def export_gguf(source: str | Path, *, quant: str = "f16", out: Path | None = None, log=None) -> Path:
    """Write one GGUF file; a run or adapter is merged (and verified) first, or its fresh merge is reused."""
    from finetune.export.gguf_vocab import load_tokenizer
    from finetune.export.gguf_writer import QUANTS, check_architecture, check_exportable, write_gguf
    from finetune.run.records import GGUF_SOURCE_PATH, GGUF_SOURCE_SHA256

    log = log or stderr
    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            "--format gguf needs the gguf package, which is not installed: pip install 'finetune-recipes[gguf]'"
        )
    if quant not in QUANTS:
        raise UserError(f"--quant: expected one of {', '.join(QUANTS)}, found {quant!r}")
    plan = _plan(source, quant, log)
    out = out or plan.out
    if out.exists():
        raise UserError(f"--out: {out} already exists; choose another --out or remove it (nothing was written)")
    check_architecture(plan.config, source)
    tokenizer = load_tokenizer(plan.tokenizer_dir)
    vocab = check_exportable(plan.config, tokenizer, source)
    model_dir = plan.model_dir
    if model_dir is None:
        from finetune.merge.bake import run_merge

        log(plan.merge_note)
        model_dir = run_merge(source, overwrite=plan.replace_merge, log=log)
    log(f"writing {out} ({quant}, tokenizer {vocab.model}/{vocab.pre}) from {model_dir}")
    metadata = {GGUF_SOURCE_SHA256: plan.digest, GGUF_SOURCE_PATH: str(plan.origin.resolve())}
    result = write_gguf(model_dir, out, quant=quant, name=plan.name, metadata=metadata)
    size = out.stat().st_size / 2**20
    log(f"wrote {out}: {result.architecture}, {result.tensors} tensors, {quant}, {size:.1f} MiB; made from "
        f"{plan.origin} (sha256 {plan.digest[:12]})")
    _check_in_llama_cpp(out, tokenizer, log)
    log(f"try: llama-cli -m {out} -cnv   (or an Ollama Modelfile with FROM {out})")
    return out


def _plan(source: str | Path, quant: str, log) -> _Plan:
    """Find the model (or the adapter and its base) behind `source` without loading weights."""
    from finetune.run.layout import MergedDir
    from finetune.run.records import content_sha256, read_merge_report
    from finetune.run.resolve import resolve

    found = resolve(str(source), local=True)
    name = found.recipe.name if found.recipe is not None else None
    if found.adapter is None:  # a complete model: a full fine-tuning run, a merge, a model directory
        model_dir = Path(found.weights)
        if found.kind == "merged":
            report = read_merge_report(MergedDir(model_dir))
            _note_failed_check(model_dir, report, log)
            origin, digest = Path(report.adapter), report.adapter_sha256 or content_sha256(model_dir)
            name = found.run.read_recipe().name if found.run is not None else None
        else:
            origin, digest = model_dir, content_sha256(model_dir)
        default = found.run.gguf(quant) if found.kind == "run" else model_dir.parent / f"{model_dir.name}-{quant}.gguf"
        return _model_plan(model_dir, name or model_dir.resolve().name, default, origin, digest)
    digest = content_sha256(found.adapter)
    if found.kind != "run":  # a checkpoint or an adapter directory: merged beside it
        out = Path(source).with_name(f"{Path(source).name}-merged-{quant}.gguf")
        return _adapter_plan(source, name or Path(source).name, out, found.adapter, digest,
                             f"{source} is an adapter: merging it into its base first")
    merged = found.run.merged
    report = read_merge_report(merged) if merged.exists() else None
    if report is not None and report.adapter_sha256 == digest:
        log(f"using the merged model in {merged.root} (made from this run's adapter, sha256 {digest[:12]})")
        _note_failed_check(merged.root, report, log)
        return _model_plan(merged.root, name, found.run.gguf(quant), found.adapter, digest)
    if report is not None and report.adapter_sha256 is None:
        note = f"{merged.root} does not record which adapter it was made from (an older finetune): merging again"
    elif report is not None:
        note = (f"{merged.root} was merged from an earlier adapter (sha256 {report.adapter_sha256[:12]}, now "
                f"{digest[:12]}): merging again")
    else:
        note = f"{source} holds an adapter: merging it into its base first"
    plan = _adapter_plan(source, name, found.run.gguf(quant), found.adapter, digest, note)
    plan.replace_merge = True
    return plan


def _model_plan(model_dir: Path, name: str, out: Path, origin: Path, digest: str) -> _Plan:
    from finetune.run.layout import MODEL_CONFIG

    config = json.loads((model_dir / MODEL_CONFIG).read_text(encoding="utf-8"))
    return _Plan(config, model_dir, name, out, origin, digest, model_dir)


def _adapter_plan(source: str | Path, name: str, out: Path, origin: Path, digest: str, note: str) -> _Plan:
    """The base's config and the adapter's tokenizer (which carries tokens added in training), before the merge."""
    from transformers import AutoConfig

    from finetune.merge.bake import merge_source

    found = merge_source(source)  # the merge's own refusals (prompt tuning, LoftQ, a full run ...) come first
    try:
        config = AutoConfig.from_pretrained(found.base).to_dict()
    except (OSError, ValueError) as exc:
        raise UserError(f"{found.base}: cannot read the base model's config: {str(exc).splitlines()[0]}") from None
    has_tokenizer = (found.adapter_dir / "tokenizer_config.json").is_file()
    tokenizer_dir = found.adapter_dir if has_tokenizer else Path(found.base)
    return _Plan(config, tokenizer_dir, name, out, origin, digest, merge_note=note)


def _note_failed_check(model_dir: Path, report, log) -> None:
    if report.gate is not None and not report.gate.passed:
        log(f"warning: {model_dir} failed its merge check ({'; '.join(report.gate.failed)}) and was kept with "
            "--keep-failed; exporting it as it is")


def _check_in_llama_cpp(out: Path, tokenizer, log) -> None:
    """Load the file in llama.cpp and have it tokenise a chat prompt as transformers does (a load with mmap and
    a few tokens of generation: seconds even for a 7B model)."""
    from finetune.export.llama_cpp import INSTALL_HINT, LlamaCpp, available, check_tokenization

    if not available():
        log(f"note: llama.cpp is not installed here, so {out} was not loaded in it; {INSTALL_HINT}")
        return
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               tokenize=False, add_generation_prompt=True)
    else:
        prompt = "The capital of France is"
    try:
        check_tokenization(LlamaCpp(out, threads=min(8, os.cpu_count() or 1)), tokenizer, prompt)
    except UserError as exc:
        out.unlink()  # a GGUF llama.cpp refuses or misreads is not an output to keep
        raise UserError(f"{exc}; {out} was removed") from None
    log(f"llama.cpp loads {out} and tokenises a chat prompt as transformers does")
