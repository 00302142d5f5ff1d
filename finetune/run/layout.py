"""The run directory is the product's file format; this module is its one owner.

Every path inside a run directory is named here and nowhere else: other modules ask a `RunDir`
for `run.adapter` or `run.summary` rather than spelling `"adapter"` or `"summary.json"`. What a run
holds, who writes each file and who reads it is the table `CONTENTS` (rendered into
docs/architecture.md by `contract_table`, and a test keeps the two equal). The records in it
(summary, provenance, merge report, audit) are read and written by `finetune.run.records`; what a
user-given path names (a run, an adapter, a merged model, a checkpoint ...) is answered by
`finetune.run.resolve`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.recipe import Recipe

RUNS = "runs"  # where runs go when output.dir is not set: runs/<name> (recipe.schema.Recipe.run_dir)
RECIPE = "recipe.yaml"
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
AUDIT = "audit.json"
SUMMARY = "summary.json"
ADAPTER = "adapter"
MODEL = "model"
INITIAL_ADAPTER = "adapter_init"  # PiSSA/OLoRA: the adapter before training; PEFT names it after the folder
MERGED = "merged"
CHECKPOINTS = "checkpoints"
LOCK = ".finetune.lock"
MERGE_REPORT = "merge_report.json"
MERGED_BUNDLE = "provenance"  # merged/provenance/: the run's recipe, audit and summary (not at the top: see below)
ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "deepspeed.json"
LAUNCH_SCRIPT = "launch.sh"
LAUNCH_ERROR = "error.txt"
MODEL_CARD = "README.md"
CHECKPOINT_MARKER = "finetune_checkpoint.json"
CHECKPOINT_ADALORA_STATE = "adalora_state.pt"  # AdaLoRA: unpruned adapter, rank pattern, allocator (adapters.hooks)
TRACKER_DIRS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}
GGUF_QUANTS = ("f16", "bf16", "q8_0", "f32")  # the quants `finetune export` writes (export.gguf_writer.QUANTS)
# Files the libraries write into an adapter or a model directory (named here so the resolver reads one list).
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Entry:
    """One row of the run-directory contract."""

    path: str
    what: str
    written_by: str
    read_by: str


# The contract. `finetune train --overwrite` clears the entries marked derived (what the previous run made).
CONTENTS = (
    Entry(RECIPE, "the resolved recipe (redacted); it makes a directory a run",
          "train (before the model loads), launcher", "every command given a run (`RunDir.read_recipe`)"),
    Entry(PROVENANCE, "status (running, completed, interrupted, failed, *-before-start), command, versions, "
          "data hashes, what model.path named, hardware, final metrics",
          "train (start, end)", "resolve (why a run has no output), claim (a failed start is replaced), merge"),
    Entry(METRICS, "one record per logged step", "train", "resume (trimmed to the checkpoint), users"),
    Entry(AUDIT, "label audit per dataset (trained-token fractions, dropped rows)", "train", "merge (copied), users"),
    Entry(SUMMARY, "the run's outcome: steps, losses, timings, memory", "train (end)", "merge (copied), users"),
    Entry(f"{ADAPTER}/", "the trained adapter, tokenizer, chat template, model card", "train (adapter kinds)",
          "merge, export, chat, generate, eval, a later run's model.path"),
    Entry(f"{INITIAL_ADAPTER}/", "PiSSA/OLoRA only, while training: the adapter as initialised, to convert the "
          "trained one into a plain LoRA on the original base", "train (adapters.hooks)", "train (saving)"),
    Entry(f"{MODEL}/", "the fully fine-tuned model, tokenizer, chat template, model card", "train (adapter.kind: full)",
          "export, chat, generate, eval, a later run's model.path"),
    Entry(f"{CHECKPOINTS}/checkpoint-N/", f"resumable checkpoints, each committed by {CHECKPOINT_MARKER} "
          f"(AdaLoRA ones also hold {CHECKPOINT_ADALORA_STATE})", "train",
          "train --resume, chat/generate/eval/merge of a checkpoint"),
    Entry(f"{MERGED}/", f"the adapter baked into its base: weights, tokenizer, {MERGE_REPORT} (with the adapter's "
          f"sha256), {PROVENANCE}, {MERGED_BUNDLE}/, {MODEL_CARD}", "merge (export merges first when it is missing "
          "or stale)", "export, chat, generate, eval, a later run's model.path (start_from: merged)"),
    Entry("<name>-<quant>.gguf", "a GGUF export; its metadata holds the sha256 of what it was made from", "export",
          "llama.cpp, Ollama"),
    Entry(f"{ACCELERATE_CONFIG}, {DEEPSPEED_CONFIG}, {LAUNCH_SCRIPT}, {LAUNCH_ERROR}",
          "what a multi-process run launched, and a worker's error", "train (launcher, workers)", "launcher, users"),
    Entry(", ".join(f"{d}/" for d in TRACKER_DIRS.values()), "tracker output", "the trackers", "users"),
    Entry(LOCK, "who is writing the directory now", "train, launcher", "train, launcher"),
)


def contract_table() -> str:
    """The run-directory contract as a markdown table (docs/architecture.md embeds it)."""
    rows = ["| path | what | written by | read by |", "|---|---|---|---|"]
    rows += [f"| `{e.path}` | {e.what} | {e.written_by} | {e.read_by} |" for e in CONTENTS]
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class MergedDir:
    """A merged model directory (`<run>/merged`, or wherever `finetune merge --out` put it)."""

    root: Path

    @property
    def report(self) -> Path:
        return self.root / MERGE_REPORT

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE

    @property
    def bundle(self) -> Path:
        """The run's recipe, audit and summary, in a subdirectory: a recipe.yaml at the top would make it a run."""
        return self.root / MERGED_BUNDLE

    @property
    def card(self) -> Path:
        return self.root / MODEL_CARD

    def exists(self) -> bool:
        """Whether `root` holds a merge that finished (the report is written after the weights)."""
        return self.report.is_file()


@dataclass(frozen=True)
class RunDir:
    """One run directory and the paths in it (see `CONTENTS` for what each holds)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> RunDir:
        """The run directory at `path` (which need not exist yet)."""
        return cls(Path(path))

    def exists(self) -> bool:
        """Whether `root` holds a run: a directory with the resolved recipe every run writes first."""
        return (self.root / RECIPE).is_file()

    def holds_only_a_recipe(self) -> bool:
        """Whether `root`'s recipe.yaml is one no run wrote (`finetune init`'s, the user's own): every run writes
        provenance.json with it."""
        return self.recipe.is_file() and not self.provenance.is_file()

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
    def initial_adapter(self) -> Path:
        return self.root / INITIAL_ADAPTER

    @property
    def merged(self) -> MergedDir:
        return MergedDir(self.root / MERGED)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        """Where the Trainer writes the checkpoint of optimizer step `step`."""
        return self.checkpoints / f"checkpoint-{step}"

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

    @property
    def launch_error(self) -> Path:
        return self.root / LAUNCH_ERROR

    def tracker_dir(self, tracker: str) -> Path:
        """Where a tracker (tensorboard, wandb, mlflow) writes inside the run."""
        return self.root / TRACKER_DIRS[tracker]

    def gguf(self, quant: str) -> Path:
        """The default path of a GGUF export of this run."""
        return self.root / f"{self.name}-{quant}.gguf"

    def artifact(self, adapter_kind: str) -> Path:
        """What training produced: `model/` for full fine-tuning, else `adapter/`."""
        return self.model if adapter_kind == "full" else self.adapter

    def derived(self) -> list[Path]:
        """What a previous run here made and a new run must not be mistaken for: its outputs, exports, records.

        Only paths this package writes under its own names: a file the user put into the directory is
        never listed. Checkpoints are not listed either: --overwrite keeps them but un-commits them
        (lifecycle), and the tracker directories keep their history.
        """
        found = [self.adapter, self.model, self.initial_adapter, self.summary, self.audit, self.accelerate_config,
                 self.deepspeed_config, self.launch_script, self.launch_error]
        found = [p for p in found if p.exists()]
        if self.merged.exists():  # a merged/ without a report is not ours (or a merge that died): left alone
            found.append(self.merged.root)
        found += [self.gguf(q) for q in GGUF_QUANTS if self.gguf(q).is_file()]
        return found

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


def step_in_name(path: Path) -> int | None:
    """N of a `checkpoint-N` directory name, or None for any other name."""
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def run_of_checkpoint(path: Path) -> RunDir | None:
    """The run a `<run>/checkpoints/checkpoint-N` directory belongs to, or None."""
    if step_in_name(path) is None or path.parent.name != CHECKPOINTS:
        return None
    run = RunDir(path.parent.parent)
    return run if run.exists() else None
