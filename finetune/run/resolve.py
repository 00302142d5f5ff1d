"""What a user-given path names: the one resolver every command asks.

| kind | example | what loads |
|---|---|---|
| run | `runs/my-dpo` (or its `adapter/`) | its adapter on the weights it trained on (via earlier runs); or `model/` |
| checkpoint | `runs/my-dpo/checkpoints/checkpoint-20` | the checkpoint's adapter (or model), on the run's base |
| adapter | a PEFT adapter directory outside a run | the adapter on its `base_model_name_or_path` |
| merged | `runs/my-sft/merged` | itself; refused when the adapter it was made from has changed since |
| model | a transformers model directory | itself |
| builtin | `builtin:tiny-llama`, `builtin:smollm2-135m` | provisioned into the cache on first use (`finetune models`) |
| hub | `org/name` | downloaded by transformers |

A run that starts from an earlier run (`model.path: runs/my-sft`) trains on what its
`start_from` says (model.start): `adapter` keeps training the earlier run's adapter on the
earlier run's base, so the later adapter alone on that base is the model; `merged` trains a new
adapter on `<earlier>/merged`, which is then its base; a full fine-tuning run's `model/` is a
base like any other. `start_of` follows that chain to the true base, however long it is.

A name that looks local (`./x`, `~/x`, `/x`, `a/b/c`, `runs/x` where `runs` exists, or a close
match of a run directory here) and does not exist is "no such directory" at once, with a
did-you-mean over its siblings: never a Hub lookup, which retries for half a minute first.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import UserError
from finetune.run.layout import ADAPTER_CONFIG, MODEL_CONFIG, RUNS, MergedDir, RunDir, run_of_checkpoint

if TYPE_CHECKING:
    from finetune.recipe import Recipe
    from finetune.recipe.schema import ModelSection

MAX_DEPTH = 16  # runs started from runs started from ...; deeper means a cycle
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class Located:
    """What kind of thing a name is, before anything in it is read."""

    kind: str  # run, checkpoint, adapter, merged, model, builtin, hub
    spec: str
    path: Path | None = None  # the local directory (for a run: its root, also when given its adapter/ or model/)
    run: RunDir | None = None  # the run it belongs to


@dataclass(frozen=True)
class Resolved:
    """What to load for a name: full weights, optionally one adapter on them, and the tokenizer."""

    kind: str
    spec: str
    weights: str  # a local directory or Hub id that from_pretrained loads as a complete model
    tokenizer: str  # where the tokenizer and its chat template come from
    revision: str | None = None  # Hub revision of `weights`
    adapter: Path | None = None  # the adapter to put on `weights` (the last one of a chain)
    run: RunDir | None = None
    recipe: Recipe | None = None  # the run's recipe
    origin: str | None = None  # the weights this model was trained or merged from (eval --base compares them)
    merged: MergedDir | None = None  # for start_from merged: the earlier run's merge these weights are

    @property
    def adapter_kind(self) -> str | None:
        """adapter.kind of the run, when the name is a run or one of its checkpoints."""
        return self.recipe.adapter.kind if self.recipe is not None else None


def _prefix(key: str | None) -> str:
    return f"{key}: " if key else ""


def locate(spec: str, *, key: str | None = None, local: bool = False) -> Located:
    """Say what kind of thing `spec` names, reading only marker files; refuse a missing local path at once.

    `local`: the command reads a directory (merge, export), so a name that does not exist is never a Hub id.
    """
    from finetune.model.builtin import BUILTIN_PREFIX

    if spec.startswith(BUILTIN_PREFIX):
        return Located("builtin", spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if local or looks_local(spec):
            raise UserError(_prefix(key) + no_such_directory(spec))
        return Located("hub", spec)
    if not path.is_dir():
        raise UserError(f"{_prefix(key)}{spec}: is a file; expected a run, model or adapter directory")
    if (checkpoint_run := run_of_checkpoint(path)) is not None:  # first: a checkpoint holds a recipe.yaml too
        return Located("checkpoint", spec, path, checkpoint_run)
    run = RunDir(path)
    if run.exists():
        return Located("run", spec, path, run)
    parent = RunDir(path.parent)
    if parent.exists() and path.name in (parent.adapter.name, parent.model.name):
        return Located("run", spec, parent.root, parent)  # runs/x/adapter is the output of runs/x
    if (path / ADAPTER_CONFIG).is_file():
        return Located("adapter", spec, path)
    if (path / MODEL_CONFIG).is_file():
        if MergedDir(path).exists():
            return Located("merged", spec, path, parent if parent.exists() else None)
        return Located("model", spec, path)
    raise UserError(
        f"{_prefix(key)}{spec}: not a run, model or adapter directory "
        f"(no recipe.yaml, {MODEL_CONFIG} or {ADAPTER_CONFIG})"
    )


def looks_local(spec: str) -> bool:
    """Whether a name that does not exist was meant as a local path rather than a Hub id (org/name)."""
    if spec.startswith((".", "/", "~", "\\")) or not HUB_ID.fullmatch(spec):
        return True
    head, sep, _ = spec.partition("/")
    if sep:
        return Path(head).is_dir()  # runs/typo: `runs` is here, so this is a path
    # tiny-sft-lroa next to tiny-sft-lora, or a run's name given for its directory runs/tiny-sft-lora
    return bool(_close_runs(Path("."), spec) or _close_runs(Path(RUNS), spec))


def _close_runs(parent: Path, name: str) -> list[str]:
    try:
        runs = [p.name for p in parent.iterdir() if p.is_dir() and RunDir(p).exists()]
    except OSError:
        return []
    return difflib.get_close_matches(name, runs, n=3, cutoff=0.75)


def no_such_directory(spec: str) -> str:
    """'runs/typo: no such directory; did you mean runs/tiny-sft-lora?' (siblings that are runs first)."""
    path = Path(spec).expanduser()
    parent = path.parent
    message = f"{spec}: no such directory"
    if parent == Path(".") and (close := _close_runs(Path(RUNS), path.name)) and not _close_runs(parent, path.name):
        return message + "; did you mean " + " or ".join(str(Path(RUNS) / name) for name in close) + "?"
    if not parent.is_dir():
        return message + f" ({parent} does not exist either)"
    close = _close_runs(parent, path.name)
    if not close:
        dirs = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
        close = difflib.get_close_matches(path.name, dirs, n=3, cutoff=0.6)
    if close:
        return message + "; did you mean " + " or ".join(str(parent / name) for name in close) + "?"
    runs = sorted(p.name for p in parent.iterdir() if p.is_dir() and RunDir(p).exists())
    if runs:
        shown = ", ".join(runs[:8]) + (", ..." if len(runs) > 8 else "")
        return message + f"; runs in {parent}: {shown}"
    return message


def resolve(spec: str, *, key: str | None = None, local: bool = False) -> Resolved:
    """What to load for `spec` (see the module docstring); raise UserError before any weight loads.

    `local`: only a local directory (or builtin name) will do; a missing one is never taken for a Hub id.
    """
    found = locate(spec, key=key, local=local)
    if found.kind == "builtin":
        from finetune.model.builtin import resolve_model_path

        weights = resolve_model_path(spec)
        return Resolved("builtin", spec, weights, weights)
    if found.kind == "hub":
        from finetune.recipe.inputs import refuse_offline_hub

        refuse_offline_hub(spec, key or "SOURCE")  # offline mode cannot reach it: say so before torch loads
        return Resolved("hub", spec, spec, spec)
    path = found.path
    assert path is not None
    if found.kind == "run":
        return _resolve_run(found.run, spec)
    if found.kind == "checkpoint":
        return _resolve_checkpoint(path, found.run, spec)
    if found.kind == "adapter":
        base = _adapter_base(path)
        has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
        return Resolved("adapter", spec, base, str(path) if has_tokenizer else base, adapter=path, origin=base)
    if found.kind == "merged":
        report = check_merged_fresh(MergedDir(path))
        return Resolved("merged", spec, str(path), str(path), run=found.run, origin=report.base,
                        merged=MergedDir(path))
    return Resolved("model", spec, str(path), str(path))


def _adapter_base(adapter: Path) -> str:
    """The base an adapter outside a run names in its adapter_config.json."""
    config_file = adapter / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_file}: cannot read the adapter config: {exc}") from None
    if not base:
        raise UserError(f"{config_file}: base_model_name_or_path is not set; cannot tell which base it belongs to")
    located = locate(base, key=f"{config_file}: base_model_name_or_path")
    if located.kind == "builtin":
        from finetune.model.builtin import resolve_model_path

        return resolve_model_path(base)
    return base


def _resolve_run(run: RunDir, spec: str) -> Resolved:
    recipe = run.read_recipe()
    artifact = run.artifact(recipe.adapter.kind)
    full = recipe.adapter.kind == "full"
    if not (artifact / (MODEL_CONFIG if full else ADAPTER_CONFIG)).is_file():
        raise UserError(unfinished(run, artifact))
    start = start_of(recipe.model, key=f"{run.recipe}: model", depth=1)
    _check_start_unchanged(run, start)
    if full:
        return Resolved("run", spec, str(artifact), str(artifact), run=run, recipe=recipe, origin=start.weights)
    return Resolved("run", spec, start.weights, str(artifact), revision=start.revision, adapter=artifact, run=run,
                    recipe=recipe, origin=start.weights)


def _resolve_checkpoint(path: Path, run: RunDir, spec: str) -> Resolved:
    recipe = run.read_recipe()
    start = start_of(recipe.model, key=f"{run.recipe}: model", depth=1)
    tokenizer = str(path) if any((path / name).is_file() for name in TOKENIZER_FILES) else start.tokenizer
    if (path / ADAPTER_CONFIG).is_file():
        return Resolved("checkpoint", spec, start.weights, tokenizer, revision=start.revision, adapter=path,
                        run=run, recipe=recipe, origin=start.weights)
    if (path / MODEL_CONFIG).is_file():
        return Resolved("checkpoint", spec, str(path), tokenizer, run=run, recipe=recipe, origin=start.weights)
    raise UserError(f"{spec}: a checkpoint without {ADAPTER_CONFIG} or {MODEL_CONFIG}; was it written completely?")


def start_of(model: ModelSection, *, key: str = "model", depth: int = 0) -> Resolved:
    """What a recipe's model section trains from: base weights, and the earlier run's adapter to keep training.

    `weights` is always the true base (followed through earlier runs); `adapter` is set when
    training continues an earlier run's adapter (start_from adapter), and then names that adapter.
    """
    if model.start_from != "auto" and not RunDir.at(model.path).exists():
        found = "does not exist" if not Path(model.path).expanduser().exists() else "has no recipe.yaml"
        raise UserError(
            f"{key}.start_from: is '{model.start_from}', so {key}.path must be the directory of an earlier "
            f"`finetune train` run, but {model.path} {found}; train that run first (or fix the path, or remove "
            "start_from to use model.path as a base model)"
        )
    found = locate(model.path, key=f"{key}.path")
    if found.kind != "run":
        base = resolve(model.path, key=f"{key}.path")
        return Resolved(base.kind, model.path, base.weights, base.tokenizer, revision=model.revision,
                        adapter=base.adapter, origin=base.origin, merged=base.merged)
    if depth >= MAX_DEPTH:
        raise UserError(f"{key}.path: runs started from runs more than {MAX_DEPTH} deep; is there a cycle?")
    run = found.run
    earlier = run.read_recipe()
    trained = earlier.adapter.kind
    choice = model.start_from if model.start_from != "auto" else ("model" if trained == "full" else "adapter")
    if trained == "full":
        if choice != "model":
            raise UserError(
                f"{key}.start_from: is '{choice}', but {run.root} trained the full model (adapter.kind: full): it "
                f"has no adapter and nothing to merge; remove start_from to start from {run.model}"
            )
        _require(run, run.model / MODEL_CONFIG, key)
        return Resolved("run", model.path, str(run.model), str(run.model), run=run, recipe=earlier)
    if choice == "merged":
        merged = run.merged
        if not merged.exists():
            raise UserError(f"{key}.path: {run.root} is a run directory but {merged.root} holds no finished merge; "
                            f"run `finetune merge {run.root}` first")
        report = check_merged_fresh(merged)
        return Resolved("merged", model.path, str(merged.root), str(merged.root), run=run, recipe=earlier,
                        origin=report.base, merged=merged)
    _require(run, run.adapter / ADAPTER_CONFIG, key)
    base = start_of(earlier.model, key=f"{run.recipe}: model", depth=depth + 1)
    return Resolved("run", model.path, base.weights, str(run.adapter), revision=base.revision, adapter=run.adapter,
                    run=run, recipe=earlier, origin=base.weights)


def _require(run: RunDir, marker: Path, key: str) -> None:
    if not marker.is_file():
        raise UserError(f"{key}.path: {unfinished(run, marker.parent)}")


def unfinished(run: RunDir, artifact: Path) -> str:
    """Why a run has no output yet, from its provenance, and what to do."""
    from finetune.run import records

    provenance = records.read_provenance(run.provenance)
    status = provenance.status if provenance else None
    recipe = (provenance.recipe_file if provenance else None) or "RECIPE"
    where = f"{run.root} has no {artifact.name}/"
    if run.holds_only_a_recipe() and not run.metrics.exists():
        return (f"{run.root} holds {run.recipe.name} but is not a run directory ({run.provenance.name}, which "
                f"`finetune train` writes when it starts, is missing); to train that recipe: "
                f"finetune train {run.recipe}")
    if provenance is None:
        return f"{where}; did the run finish? (see {run.metrics})"
    if provenance.before_start:
        return f"{where}: it stopped before its first training step ({status}), so nothing was trained; run " \
               f"`finetune train {recipe}` again (it replaces this directory)"
    if status == records.INTERRUPTED:
        return f"{where}: training was interrupted at step {provenance.steps_done}; continue it with " \
               f"`finetune train {recipe} --resume`"
    if status == records.RUNNING:
        return f"{where}: it is still training (or its process was killed; see {run.provenance})"
    return f"{where}: training ended with status '{status}' (see {run.provenance} and {run.metrics})"


def check_merged_fresh(merged: MergedDir):
    """The merge report, after checking the adapter it was made from has not changed since; UserError if it has."""
    from finetune.run.records import content_sha256, read_merge_report

    report = read_merge_report(merged)
    assert report is not None  # callers check merged.exists()
    if report.adapter_sha256 is None:
        return report  # a merge from before origins were recorded: nothing to compare with
    adapter = _adapter_of_merge(merged, report)
    if adapter is None:
        return report  # the adapter is gone (or moved): the merged model stands alone
    now = content_sha256(adapter)
    if now != report.adapter_sha256:
        run = RunDir(merged.root.parent)
        again = run.root if run.exists() and run.merged == merged else adapter
        raise UserError(
            f"{merged.root} is stale: it was merged from {adapter} (sha256 {report.adapter_sha256[:12]}), which has "
            f"changed since (now {now[:12]}); merge again: finetune merge {again} --overwrite"
        )
    return report


def _adapter_of_merge(merged: MergedDir, report) -> Path | None:
    run = RunDir(merged.root.parent)
    if run.exists() and run.merged == merged:  # <run>/merged: the sibling adapter, wherever the run moved to
        return run.adapter if run.adapter.is_dir() else None
    adapter = Path(report.adapter)
    return adapter if adapter.is_dir() else None


def _check_start_unchanged(run: RunDir, start: Resolved) -> None:
    """A run trained on an earlier run's merge must still find that merge, not a newer one."""
    if start.merged is None:
        return
    from finetune.run.records import read_merge_report, read_provenance

    provenance = read_provenance(run.provenance)
    recorded = provenance.start if provenance else None
    if recorded is None or recorded.start_from != "merged" or recorded.sha256 is None:
        return
    report = read_merge_report(start.merged)
    if report is not None and report.adapter_sha256 not in (None, recorded.sha256):
        raise UserError(
            f"{run.root} was trained on {start.merged.root} as it was merged from adapter sha256 "
            f"{recorded.sha256[:12]}; that merge has since been redone from a different adapter "
            f"({report.adapter_sha256[:12]}), so this run's adapter no longer sits on its base. Retrain {run.root} "
            f"(finetune train {provenance.recipe_file or 'RECIPE'} --overwrite)"
        )
