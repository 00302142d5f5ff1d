"""What travels with a merged model besides its weights: a model card and the run's provenance."""

from __future__ import annotations

import shutil
from pathlib import Path

# Files of a run directory that say how the model was made (the provenance bundle, when a run wrote one).
# provenance.json goes to the top of the merged output, with the merge report (provenance.carry_into_merged)
PROVENANCE = ("recipe.yaml", "audit.json", "summary.json")


def carry_over(out: Path, report: dict, run_dir: Path | None) -> None:
    """Copy the run's provenance into `out/provenance/` and write `out/README.md`.

    A subdirectory, because a `recipe.yaml` at the top would make the merged model look like a run.
    """
    copied = []
    if run_dir is not None:
        for name in PROVENANCE:
            source = run_dir / name
            target = out / "provenance" / name
            if source.is_dir():
                shutil.copytree(source, target)
            elif source.is_file():
                target.parent.mkdir(exist_ok=True)
                shutil.copy2(source, target)
            else:
                continue
            copied.append(name)
    (out / "README.md").write_text(model_card(report, copied), encoding="utf-8")


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
