"""`finetune export --format gguf`: one GGUF file for llama.cpp/Ollama, merging an adapter first.

Everything that can refuse the export (quant type, architecture, rope scaling, tokenizer) is
checked before an adapter is merged or a byte is written. The written file is then loaded in
llama.cpp itself, when it is installed, and must tokenise a prompt as transformers does.
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
    model_dir: Path | None = None  # None: merge `source` first


def export_gguf(source: Path, *, quant: str = "f16", out: Path | None = None, log=None) -> Path:
    """Write one GGUF file; a run or adapter is merged (and verified) first, or its merge is reused."""
    from finetune.export.gguf_vocab import load_tokenizer
    from finetune.export.gguf_writer import QUANTS, check_architecture, check_exportable, write_gguf

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

        log(f"{source} holds an adapter: merging it into its base first")
        model_dir = run_merge(source, log=log)
    log(f"writing {out} ({quant}, tokenizer {vocab.model}/{vocab.pre}) from {model_dir}")
    result = write_gguf(model_dir, out, quant=quant, name=plan.name)
    size = out.stat().st_size / 2**20
    log(f"wrote {out}: {result.architecture}, {result.tensors} tensors, {quant}, {size:.1f} MiB")
    _check_in_llama_cpp(out, tokenizer, log)
    log(f"try: llama-cli -m {out} -cnv   (or an Ollama Modelfile with FROM {out})")
    return out


def _plan(source: Path, quant: str, log) -> _Plan:
    """Find the model (or the adapter and its base) behind `source` without loading weights."""
    from finetune.run.layout import RunDir

    if not source.exists():
        raise UserError(f"{source}: no such run, model or adapter directory")
    run = RunDir.at(source)
    if run.exists():
        recipe = run.read_recipe()
        if recipe.adapter.kind == "full":
            return _model_plan(run.model, recipe.name, run.gguf(quant))
        if run.merge_report.is_file():
            log(f"using the merged model in {run.merged} (from an earlier `finetune merge`)")
            return _model_plan(run.merged, recipe.name, run.gguf(quant))
        return _adapter_plan(source, recipe.name, run.gguf(quant))
    if (source / "adapter_config.json").is_file():
        return _adapter_plan(source, source.name, source.with_name(f"{source.name}-merged-{quant}.gguf"))
    if (source / "config.json").is_file():
        return _model_plan(source, source.resolve().name, source.with_name(f"{source.resolve().name}-{quant}.gguf"))
    raise UserError(
        f"{source}: not a run, model or adapter directory (no recipe.yaml, config.json or adapter_config.json)"
    )


def _model_plan(model_dir: Path, name: str, out: Path) -> _Plan:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return _Plan(config, model_dir, name, out, model_dir)


def _adapter_plan(source: Path, name: str, out: Path) -> _Plan:
    """The base's config and the adapter's tokenizer (which carries tokens added in training), before the merge."""
    from transformers import AutoConfig

    from finetune.merge.bake import locate

    found = locate(source)  # the merge's own refusals (prompt tuning, LoftQ ...) come first
    try:
        config = AutoConfig.from_pretrained(found.base).to_dict()
    except (OSError, ValueError) as exc:
        raise UserError(f"{found.base}: cannot read the base model's config: {str(exc).splitlines()[0]}") from None
    has_tokenizer = (found.adapter_dir / "tokenizer_config.json").is_file()
    return _Plan(config, found.adapter_dir if has_tokenizer else Path(found.base), name, out)


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
