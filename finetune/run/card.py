"""Model cards: the one writer of README.md next to a trained adapter or model, and of a merged model's.

Written through huggingface_hub's ModelCard/ModelCardData, so the metadata is what the Hub reads.
`base_model` is set only when the base is a Hub id; a local or built-in base means nothing to the Hub
and is named in the text instead, with its content hash (provenance.json's `base_model`). A merged
model also gets its run's provenance bundle (recipe, audit, summary) in a subdirectory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.run.layout import AUDIT, MODEL_CARD, RECIPE, SUMMARY, MergedDir, RunDir

if TYPE_CHECKING:
    from finetune.run.records import MergeReport, Provenance

PROJECT = "finetune-recipes"  # the distribution on the package index (the PyPI name "finetune" is another project)
PROJECT_URL = f"https://pypi.org/project/{PROJECT}/"
# Files of a run directory that say how the model was made (the provenance bundle, when a run wrote one).
# provenance.json goes to the top of the merged output, with the merge report (provenance.carry_into_merged)
PROVENANCE = (RECIPE, AUDIT, SUMMARY)


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


def write_training_card(artifact_dir: Path, provenance: Provenance) -> None:
    """README.md next to a trained adapter, or a fully fine-tuned model, from the run's provenance."""
    kind = "model" if provenance.recipe["adapter"]["kind"] == "full" else "adapter"
    write_card(artifact_dir, provenance, kind=kind)


def carry_over(out: Path, report: MergeReport, run_dir: Path | None) -> None:
    """Copy the run's provenance bundle into `out/provenance/` and write `out/README.md` for the merged model.

    A subdirectory, because a `recipe.yaml` at the top would make the merged model look like a run.
    """
    from finetune.run.records import read_provenance

    merged, copied, provenance = MergedDir(out), [], None
    if run_dir is not None:
        for name in PROVENANCE:
            if (source := run_dir / name).is_file():
                merged.bundle.mkdir(exist_ok=True)
                shutil.copy2(source, merged.bundle / name)
                copied.append(name)
        provenance = read_provenance(RunDir(run_dir).provenance)
    write_card(out, provenance, kind="merged", merge=report, bundle=copied)


def write_card(directory: Path, provenance: Provenance | None, *, kind: str, merge: MergeReport | None = None,
               bundle: list[str] | tuple[str, ...] = ()) -> None:
    """Write `directory/README.md` for an "adapter", a fully trained "model" or a "merged" model."""
    from huggingface_hub import ModelCard, ModelCardData

    from finetune.redact import redact

    record = redact(provenance.model_dump(mode="json")) if provenance is not None else {}
    recipe = record.get("recipe") or {}
    identity = record.get("base_model") or {}  # the true base, through earlier runs
    base = merge.base if merge else identity.get("id") or identity.get("path") or \
        (recipe.get("model") or {}).get("path") or "unknown"
    adapter = (recipe.get("adapter") or {}).get("kind") or (merge.adapter_kind if merge else "lora")
    method = (recipe.get("method") or {}).get("kind", "sft")
    data = ModelCardData(
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=["finetune", method, adapter] + (["merged"] if kind == "merged" else []),
        base_model=hub_id(base),
    )
    body = _body(record, recipe, base, kind, adapter, method, merge, bundle)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(directory / MODEL_CARD)


def _body(provenance: dict[str, Any], recipe: dict[str, Any], base: str, kind: str, adapter: str, method: str,
          merge: MergeReport | None, bundle) -> str:
    name = recipe.get("name") or (Path(merge.adapter).parent.name if merge else "model")
    what = {"adapter": f"A {adapter} adapter", "model": "A fully fine-tuned model",
            "merged": f"A model merged from a {adapter} adapter"}[kind]
    identity = provenance.get("base_model") or {}
    origin = (f"revision {identity['revision']}" if identity.get("revision") else
              f"content sha256 {identity['sha256'][:16]}" if identity.get("sha256") else "")
    start = provenance.get("start") or {}
    after = f", continuing the run `{start['run']}` (start_from: {start['start_from']})" if start else ""
    lines = [f"# {name}", "", f"{what} for `{base}`" + (f" ({origin})" if origin else "") + after +
             f", trained with {method.upper()} by [{PROJECT}]({PROJECT_URL}) {provenance.get('finetune_version', '')}."]
    lines += _data_and_training(provenance, recipe, kind, adapter)
    lines += ["", "## Use", "", "```python"]
    loader = "peft import AutoPeftModelForCausalLM" if kind == "adapter" else "transformers import AutoModelForCausalLM"
    lines += [f"from {loader}", "", f'model = {loader.split()[-1]}.from_pretrained("PATH")']
    lines += ["```", "", "Or `finetune chat PATH`" + (", `finetune merge RUN`" if kind == "adapter" else
                                                        ", `finetune export PATH --format gguf`") + "."]
    if merge is not None:
        lines += _merge_check(merge)
    if provenance:
        git = provenance.get("git")
        lines += ["", "## Provenance", "", "Package versions, hardware, data hashes and the resolved recipe: "
                  "`provenance.json`" + (f"; git {git['revision'][:12]}{' (dirty)' if git['dirty'] else ''}"
                                         if git else "") + "."
                  + (f" From the run, in `provenance/`: {', '.join(bundle)}." if bundle else "")]
    return "\n".join(lines) + "\n"


def _data_and_training(provenance: dict[str, Any], recipe: dict[str, Any], kind: str, adapter: str) -> list[str]:
    lines = []
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
        # the fields differ by kind (r for LoRA, init_r for AdaLoRA, none for IA3 ...)
        settings = [f"{k} {v}" for k, v in (recipe.get("adapter") or {}).items()
                    if k != "kind" and v not in (None, [], {})]
        if kind != "model" and settings:
            lines.append(f"- {adapter} adapter: {', '.join(settings)}")
    metrics = {k: v for k, v in (provenance.get("metrics") or {}).items()
               if k in ("global_step", "train_loss", "final_loss", "eval_loss", "eval_perplexity", "train_seconds")}
    if metrics:
        lines += ["", "## Results", "", *[f"- {k}: {v}" for k, v in metrics.items()]]
    return lines


def _merge_check(merge: MergeReport) -> list[str]:
    gate = merge.gate
    agreement = f", same top token at {merge.top_token_agreement:.1%} of positions" \
        if merge.top_token_agreement is not None else ""
    verdict = (f"; {'passed' if gate.passed else 'FAILED'} the limits {gate.limits}" if gate else "")
    lines = ["", "## Merge check", "", f"Saved in {merge.saved_dtype} (base {merge.base_dtype}), merged into the "
             f"{merge.merged_into}; logits against the adapter model: max abs diff {merge.max_abs_logit_diff:.2e}, "
             f"mean {merge.mean_abs_logit_diff:.2e}{agreement}; greedy generations agree: "
             f"{merge.greedy_generations_agree}{verdict} (`merge_report.json`)."]
    if (q := merge.vs_trained_4bit_model) is not None:
        lines.append(f"Against the 4-bit model as trained (QLoRA): max abs diff {q.max_abs_logit_diff:.2e}, "
                     f"mean {q.mean_abs_logit_diff:.2e}, same top token at {q.top_token_agreement:.1%}.")
    return lines
