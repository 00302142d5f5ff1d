"""The run directory is the product's file format; this module is its one owner.

Every path inside a run directory is named here and nowhere else: other modules ask a `RunDir`
for `run.adapter` or `run.summary` rather than spelling `"adapter"` or `"summary.json"`. A run
directory holds:

| path | what | written by |
|---|---|---|
| `recipe.yaml` | the resolved recipe (redacted); it makes a directory a run | train (before the model loads) |
| `provenance.json` | status, command, versions, data hashes, hardware, final metrics | train (start, end) |
| `metrics.jsonl` | one record per logged step | train |
| `audit.json` | label audit per dataset (trained-token fractions, dropped rows) | train |
| `summary.json` | the run's outcome: steps, losses, timings, memory | train (end) |
| `adapter/` | the trained adapter, tokenizer, chat template, model card | train (adapter kinds) |
| `model/` | the fully fine-tuned model, tokenizer, chat template, model card | train (adapter.kind: full) |
| `checkpoints/checkpoint-N/` | resumable checkpoints, each committed by a marker | train |
| `merged/` | the adapter baked into its base, with `merge_report.json` | merge |
| `<name>-<quant>.gguf` | a GGUF export | export |
| `accelerate_config.yaml`, `deepspeed.json`, `launch.sh` | what a multi-process run launched | train (launcher) |
| `tensorboard/`, `wandb/`, `mlruns/` | tracker output | the trackers |
| `.finetune.lock` | who is writing the directory now | train |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.recipe import Recipe

RECIPE = "recipe.yaml"
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
AUDIT = "audit.json"
SUMMARY = "summary.json"
ADAPTER = "adapter"
MODEL = "model"
MERGED = "merged"
CHECKPOINTS = "checkpoints"
LOCK = ".finetune.lock"
MERGE_REPORT = "merge_report.json"
ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "deepspeed.json"
LAUNCH_SCRIPT = "launch.sh"
MODEL_CARD = "README.md"
TRACKER_DIRS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}


@dataclass(frozen=True)
class RunDir:
    """One run directory and the paths in it (see the module docstring for what each holds)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> RunDir:
        """The run directory at `path` (which need not exist yet)."""
        return cls(Path(path))

    def exists(self) -> bool:
        """Whether `root` holds a run: a directory with the resolved recipe every run writes first."""
        return (self.root / RECIPE).is_file()

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def audit(self) -> Path:
        return self.root / AUDIT

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def merged(self) -> Path:
        return self.root / MERGED

    @property
    def merge_report(self) -> Path:
        return self.merged / MERGE_REPORT

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def accelerate_config(self) -> Path:
        return self.root / ACCELERATE_CONFIG

    @property
    def deepspeed_config(self) -> Path:
        return self.root / DEEPSPEED_CONFIG

    @property
    def launch_script(self) -> Path:
        return self.root / LAUNCH_SCRIPT

    def tracker_dir(self, tracker: str) -> Path:
        """Where a tracker (tensorboard, wandb, mlflow) writes inside the run."""
        return self.root / TRACKER_DIRS[tracker]

    def gguf(self, quant: str) -> Path:
        """The default path of a GGUF export of this run."""
        return self.root / f"{self.name}-{quant}.gguf"

    def artifact(self, adapter_kind: str) -> Path:
        """What training produced: `model/` for full fine-tuning, else `adapter/`."""
        return self.model if adapter_kind == "full" else self.adapter

    def read_recipe(self) -> Recipe:
        """The run's resolved recipe, validated (the one way a run's recipe.yaml is read)."""
        import yaml

        from finetune.errors import UserError
        from finetune.recipe import recipe_from_dict

        try:
            data = yaml.safe_load(self.recipe.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.root}: not a run directory (no {RECIPE})") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"{self.recipe}: not a readable run recipe: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.recipe}: not a run recipe written by `finetune train`")
        return recipe_from_dict(data, str(self.recipe))
