"""Model cards (README.md with Hub metadata) for every output: adapter, fully trained model, merged model.

Written through huggingface_hub's ModelCard/ModelCardData, so the metadata is what the Hub reads.
`base_model` is set only when the base is a Hub id; a local or built-in base means nothing to the Hub
and is named in the text instead, with its content hash (provenance.json's "base_model").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune.redact import redact

PROJECT = "finetune-recipes"  # the distribution on the package index (the PyPI name "finetune" is another project)
PROJECT_URL = f"https://pypi.org/project/{PROJECT}/"
# Files of a run directory that say how a merged model was made; copied into <merged>/provenance/, because a
# recipe.yaml at the top would make the merged model look like a run.
PROVENANCE_FILES = ("recipe", "audit", "summary")


def hub_id(base: str) -> str | None:
    """`base` if it is a Hub repo id (org/name, not a local path), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if base.startswith(("builtin:", "/", ".", "~")) or Path(base).exists() or base.count("/") != 1:
        return None
    try:
        validate_repo_id(base)
    except HFValidationError:
        return None
    return base


def write_card(directory: Path, provenance: dict[str, Any] | None, *, kind: str, merge: dict | None = None) -> None:
    """Write `directory/README.md` for an "adapter", a fully trained "model" or a "merged" model."""
    from huggingface_hub import ModelCard, ModelCardData

    provenance = redact(provenance or {})
    recipe = provenance.get("recipe") or {}
    base = (merge or {}).get("base") or (recipe.get("model") or {}).get("path") or "unknown"
    adapter = (recipe.get("adapter") or {}).get("kind") or (merge or {}).get("adapter_kind", "lora")
    method = (recipe.get("method") or {}).get("kind", "sft")
    data = ModelCardData(
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=["finetune", method, adapter] + (["merged"] if kind == "merged" else []),
        base_model=hub_id(base),
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _body(provenance, recipe, base, kind, adapter, method, merge))
    card.save(directory / "README.md")


def _body(provenance, recipe, base, kind, adapter, method, merge) -> str:
    name = recipe.get("name") or "model"
    what = {"adapter": f"A {adapter} adapter", "model": "A fully fine-tuned model",
            "merged": f"A model merged from a {adapter} adapter"}[kind]
    identity = provenance.get("base_model") or {}
    origin = (f"revision {identity['revision']}" if identity.get("revision") else
              f"content sha256 {identity['sha256'][:16]}" if identity.get("sha256") else "")
    lines = [f"# {name}", "", f"{what} for `{base}`" + (f" ({origin})" if origin else "") +
             f", trained with {method.upper()} by [{PROJECT}]({PROJECT_URL}) {provenance.get('finetune_version', '')}."]
    if provenance.get("data"):
        lines += ["", "## Data", "", "| dataset | file | sha256 |", "|---|---|---|"]
        lines += [f"| {d['key']} | `{Path(d['path']).name}` | {(d.get('sha256') or 'not hashed')[:16]} |"
                  for d in provenance["data"]]
    training = recipe.get("training") or {}
    if training:
        steps = f"{training['max_steps']} steps" if training.get("max_steps") else f"{training.get('epochs')} epochs"
        lines += ["", "## Training", "", f"- learning rate {training.get('learning_rate')} "
                  f"({training.get('lr_scheduler')}), {steps}, micro batch {training.get('micro_batch_size')} x "
                  f"{training.get('gradient_accumulation_steps')} accumulation, max length "
                  f"{training.get('max_length')}, seed {training.get('seed')}"]
        settings = [f"{k} {v}" for k, v in (recipe.get("adapter") or {}).items()
                    if k != "kind" and v not in (None, [], {})]
        if kind != "model" and settings:
            lines.append(f"- {adapter} adapter: {', '.join(settings)}")
    metrics = {k: v for k, v in (provenance.get("metrics") or {}).items()
               if k in ("global_step", "train_loss", "final_loss", "eval_loss", "eval_perplexity", "train_seconds")}
    if metrics:
        lines += ["", "## Results", "", *[f"- {k}: {v}" for k, v in metrics.items()]]
    lines += ["", "## Use", "", "```python"]
    loader = "peft import AutoPeftModelForCausalLM" if kind == "adapter" else "transformers import AutoModelForCausalLM"
    lines += [f"from {loader}", "", f'model = {loader.split()[-1]}.from_pretrained("PATH")']
    lines += ["```", "", "Or `finetune chat PATH`" + (", `finetune merge RUN`" if kind == "adapter" else
                                                        ", `finetune export PATH --format gguf`") + "."]
    if merge:
        gate = merge.get("gate") or {}
        lines += ["", "## Merge check", "", f"Saved in {merge['saved_dtype']} (base {merge['base_dtype']}); logits "
                  f"against the adapter model: max abs diff {merge['max_abs_logit_diff']:.2e}, mean "
                  f"{merge['mean_abs_logit_diff']:.2e}, same top token at {merge['top_token_agreement']:.1%} of "
                  f"positions; {'passed' if gate.get('passed') else 'FAILED'} the limits {gate.get('limits')} "
                  "(`merge_report.json`)."]
        if merge.get("vs_trained_4bit_model"):
            q = merge["vs_trained_4bit_model"]
            lines.append(f"Against the 4-bit model as trained (QLoRA): max abs diff {q['max_abs_logit_diff']:.2e}, "
                         f"mean {q['mean_abs_logit_diff']:.2e}, same top token at {q['top_token_agreement']:.1%}.")
    if provenance:
        git = provenance.get("git")
        lines += ["", "## Provenance", "", "Package versions, hardware, data hashes and the resolved recipe: "
                  "`provenance.json`" + (f"; git {git['revision'][:12]}{' (dirty)' if git['dirty'] else ''}"
                                         if git else "") + "."]
    return "\n".join(lines) + "\n"


def carry_over(out: Path, report: dict, run_dir: Path | None) -> None:
    """Give a merged model the run's provenance files (in out/provenance/) and its model card."""
    import json

    from finetune.run.layout import RunDir

    provenance = None
    if run_dir is not None:
        run = RunDir.at(run_dir)
        for attribute in PROVENANCE_FILES:
            source = getattr(run, attribute)
            if source.is_file():
                (out / "provenance").mkdir(exist_ok=True)
                shutil.copy2(source, out / "provenance" / source.name)
        if run.provenance.is_file():
            provenance = json.loads(run.provenance.read_text(encoding="utf-8"))
    write_card(out, provenance, kind="merged", merge=report)
