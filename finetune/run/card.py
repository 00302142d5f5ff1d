"""Model cards: the one writer of README.md next to a trained adapter or model, and of a merged model's.

A merged model also gets its run's provenance bundle (recipe, audit, summary) in a subdirectory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from finetune.run.layout import AUDIT, MODEL_CARD, RECIPE, SUMMARY, MergedDir

# Files of a run directory that say how the model was made (the provenance bundle, when a run wrote one).
# provenance.json goes to the top of the merged output, with the merge report (provenance.carry_into_merged)
PROVENANCE = (RECIPE, AUDIT, SUMMARY)


def carry_over(out: Path, report: dict, run_dir: Path | None) -> None:
    """Copy the run's provenance into `out/provenance/` and write `out/README.md`.

    A subdirectory, because a `recipe.yaml` at the top would make the merged model look like a run.
    """
    copied = []
    if run_dir is not None:
        for name in PROVENANCE:
            source = run_dir / name
            target = MergedDir(out).bundle / name
            if source.is_dir():
                shutil.copytree(source, target)
            elif source.is_file():
                target.parent.mkdir(exist_ok=True)
                shutil.copy2(source, target)
            else:
                continue
            copied.append(name)
    MergedDir(out).card.write_text(model_card(report, copied), encoding="utf-8")


def model_card(report: dict, provenance: list[str]) -> str:
    """A Hugging Face model card (YAML front matter + markdown) for a merged model."""
    agree = "yes" if report["greedy_generations_agree"] else "NO"
    lines = [
        "---",
        f"base_model: {report['base']}",
        "library_name: transformers",
        "tags: [finetune, lora, merged]",
        "---",
        "",
        f"# {Path(report['adapter']).parent.name if provenance else Path(report['adapter']).name} (merged)",
        "",
        f"A {report['adapter_kind']} adapter merged into `{report['base']}` with "
        f"[finetune](https://pypi.org/project/finetune/), saved in {report['saved_dtype']} "
        f"(base dtype {report['base_dtype']}); merged into the {report['merged_into']}.",
        "",
        "## Verification",
        "",
        "Logits of the saved model against the base + adapter, on the prompts in `merge_report.json`:",
        "",
        f"- max abs difference: {report['max_abs_logit_diff']:.3g}",
        f"- mean abs difference: {report['mean_abs_logit_diff']:.3g}",
        f"- greedy generations agree: {agree}",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)  # carries the chat template used in training",
        "```",
        "",
        "or `finetune chat PATH`, `finetune export PATH --format gguf`.",
    ]
    if provenance:
        lines += [
            "", "## Provenance", "",
            "`provenance.json`: the resolved recipe, package versions, data hashes, hardware and final metrics "
            "of the training run, with this merge's report. From the run, in `provenance/`: "
            + ", ".join(provenance) + ".",
        ]
    return "\n".join(lines) + "\n"


def write_training_card(artifact_dir: Path, provenance) -> None:
    """README.md next to a trained adapter or model, from the run's provenance (records.Provenance)."""
    (artifact_dir / MODEL_CARD).write_text(training_card(provenance.model_dump(mode="json")), encoding="utf-8")


def training_card(provenance: dict[str, Any]) -> str:
    """The card of a trained adapter or fully fine-tuned model."""
    from finetune.redact import redact

    provenance = redact(provenance)
    recipe, metrics = provenance["recipe"], provenance.get("metrics") or {}
    adapter, training, method = recipe["adapter"], recipe["training"], recipe["method"]
    base = recipe["model"]["path"]
    is_adapter = adapter["kind"] != "full"
    front = {"library_name": "peft" if is_adapter else "transformers", "tags": ["finetune", method["kind"],
                                                                              adapter["kind"]]}
    if base.count("/") == 1 and not Path(base).exists():
        front["base_model"] = base  # a Hub id; a local path means nothing to the Hub
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {recipe['name']}", ""]
    what = f"A {adapter['kind'].upper()} adapter" if is_adapter else "A fully fine-tuned model"
    lines += [f"{what} for `{base}`, trained with {method['kind'].upper()} by "
              f"finetune {provenance['finetune_version']}.", ""]
    lines += ["## Data", "", "| dataset | path | sha256 |", "|---|---|---|"]
    lines += [f"| {d['key']} | `{Path(d['path']).name}` | {(d.get('sha256') or 'not hashed')[:16]} |"
              for d in provenance["data"]]
    steps = f"{training['max_steps']} steps" if training["max_steps"] else f"{training['epochs']} epochs"
    lines += ["", "## Training", "",
              f"- learning rate {training['learning_rate']} ({training['lr_scheduler']}), {steps}, "
              f"micro batch {training['micro_batch_size']} x {training['gradient_accumulation_steps']} accumulation, "
              f"max length {training['max_length']}, seed {training['seed']}"]
    if adapter["kind"] != "full":  # the fields differ by kind (r for LoRA, init_r for AdaLoRA, none for IA3 ...)
        settings = [f"{key} {value}" for key, value in adapter.items() if key != "kind" and value not in (None, [], {})]
        lines.append(f"- {adapter['kind']} adapter: {', '.join(settings)}")
    shown = {k: v for k, v in metrics.items() if k in ("global_step", "train_loss", "final_loss", "eval_loss",
                                                        "eval_perplexity", "train_seconds")}
    if shown:
        lines += ["", "## Results", "", *[f"- {k}: {v}" for k, v in shown.items()]]
    if is_adapter:
        lines += ["", "## Use", "", "```python",
                  "from peft import AutoPeftModelForCausalLM",
                  "from transformers import AutoTokenizer",
                  "",
                  'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
                  "```", "", "Or bake it into the base: `finetune merge <run directory>`."]
    else:
        lines += ["", "## Use", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
                  "```"]
    lines += ["", "## Provenance", "",
              f"Package versions, hardware, data hashes and the resolved recipe: `provenance.json` in the run "
              f"directory. Recipe file: `{provenance.get('recipe_file')}`"
              + (f", git {provenance['git']['revision'][:12]}{' (dirty)' if provenance['git']['dirty'] else ''}"
                 if provenance.get("git") else "") + "."]
    return "\n".join(lines) + "\n"
