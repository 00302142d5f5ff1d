"""Provenance of a run: what produced it, on what, from which data; and a model card for its output.

`<run>/provenance.json` is written when the run starts (status "running") and rewritten when it
ends (completed, interrupted or failed, with the final metrics). Everything in it passes
through `redact`, so no token from the environment or the recipe is ever written.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from finetune import __version__
from finetune.data.sources import sha256_file
from finetune.recipe.schema import Recipe
from finetune.redact import redact
from finetune.run.checkpoints import write_atomic

PACKAGES = (
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "safetensors",
    "bitsandbytes", "deepspeed", "wandb", "mlflow-skinny", "mlflow", "tensorboard",
)


def hash_data(recipe: Recipe) -> list[dict[str, Any]]:
    """One entry per dataset of the recipe: its key path, resolved path, and sha256 if it is a local file."""
    from finetune.data.sources import resolve_dataset_path

    entries = []
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split)):
            path = Path(resolve_dataset_path(spec))
            entry: dict[str, Any] = {"key": f"data.{split}[{i}]", "path": str(path)}
            if path.is_file():
                entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
            else:
                entry.update(sha256=None, note="Hub dataset: identified by id, split and subset, not hashed")
            entries.append(entry)
    return entries


def git_revision(directory: Path) -> dict[str, Any] | None:
    """HEAD commit of the git repository holding `directory` (and whether it has uncommitted changes)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        root = git("rev-parse", "--show-toplevel")
        revision = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None  # no git, not a repository, or a repository without commits
    return {"repository": root, "revision": revision, "dirty": dirty}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "finetune": __version__}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    """CPU, memory and GPUs of this machine."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {
            "version": torch.version.cuda,
            "devices": [
                {"name": props.name, "memory_bytes": props.total_memory}
                for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
            ],
        }
    return info


def start_provenance(recipe: Recipe, source: Path | None, data: list[dict[str, Any]], *,
                     resumed_from: str | None) -> dict[str, Any]:
    """The provenance of a run as it starts; `finish_provenance` completes it."""
    return {
        "finetune_version": __version__,
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["finetune" if sys.argv[0].endswith(("__main__.py", "finetune")) else sys.argv[0], *sys.argv[1:]],
        "recipe_file": str(source) if source else None,
        "git": git_revision(source.resolve().parent) if source else None,
        "resumed_from": resumed_from,
        "recipe": recipe.model_dump(mode="json"),
        "data": data,
        "packages": package_versions(),
        "hardware": hardware(),
    }


def finish_provenance(provenance: dict[str, Any], status: str, metrics: dict[str, Any] | None = None) -> None:
    provenance["status"] = status
    provenance["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if metrics is not None:
        provenance["metrics"] = metrics


def write_provenance(provenance: dict[str, Any], path: Path) -> None:
    """Write provenance.json, redacted."""
    write_atomic(path, json.dumps(redact(provenance), indent=2, default=str) + "\n")


def model_card(provenance: dict[str, Any], *, merged: bool = False) -> str:
    """A README.md for the adapter (or model, or merged model) directory, from the run's provenance."""
    provenance = redact(provenance)
    recipe, metrics = provenance["recipe"], provenance.get("metrics") or {}
    adapter, training, method = recipe["adapter"], recipe["training"], recipe["method"]
    base = recipe["model"]["path"]
    is_adapter = adapter["kind"] != "full" and not merged
    front = {"library_name": "peft" if is_adapter else "transformers", "tags": ["finetune", method["kind"],
                                                                              adapter["kind"]]}
    if base.count("/") == 1 and not Path(base).exists():
        front["base_model"] = base  # a Hub id; a local path means nothing to the Hub
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {recipe['name']}", ""]
    what = (f"A model merged from a {adapter['kind'].upper()} adapter" if merged
            else f"A {adapter['kind'].upper()} adapter" if is_adapter else "A fully fine-tuned model")
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
    if merged and provenance.get("merge"):
        report = provenance["merge"]
        lines += ["", "## Merge check", "",
                  f"Saved in {report['saved_dtype']} (base {report['base_dtype']}); logits vs the adapter model: max "
                  f"abs diff {report['max_abs_logit_diff']:.2e}; greedy generations agree: "
                  f"{report['greedy_generations_agree']} (`merge_report.json`)."]
    lines += ["", "## Provenance", "",
              f"Package versions, hardware, data hashes and the resolved recipe: `provenance.json` in the run "
              f"directory. Recipe file: `{provenance.get('recipe_file')}`"
              + (f", git {provenance['git']['revision'][:12]}{' (dirty)' if provenance['git']['dirty'] else ''}"
                 if provenance.get("git") else "") + "."]
    return "\n".join(lines) + "\n"


def carry_into_merged(run_dir: Path, out: Path, merge_report: dict[str, Any]) -> None:
    """Give a merged model its run's provenance, with the merge report (the card is model_card.carry_over's)."""
    source = run_dir / "provenance.json"
    if not source.is_file():
        return  # a run from before provenance existed
    provenance = json.loads(source.read_text(encoding="utf-8"))
    provenance["merge"] = merge_report
    write_provenance(provenance, out / "provenance.json")
