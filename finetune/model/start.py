"""Where training starts: a base model, or the output of an earlier `finetune train` run.

`model.path: runs/my-sft` names an earlier run (a directory with the recipe.yaml that every run writes).
Its resolved recipe says what the run trained, so we know which base an adapter belongs to, and the
usual SFT -> DPO pipeline needs no hand-copied paths: a wrong base under an adapter silently degrades
the model (unsloth #1519), so the base is never taken from the user when it can be read off the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe.schema import LoraFields, Recipe
from finetune.run.layout import ADAPTER_CONFIG, RunDir

# Adapter settings baked into the saved adapter's shape and scale: a recipe that continues an adapter
# cannot change them (dropout is a training-time setting and may differ).
FIXED_ADAPTER_FIELDS = ("r", "alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save")


@dataclass(frozen=True)
class Start:
    """What a run loads: base weights, optionally an adapter to keep training, and the tokenizer."""

    base: str  # local directory or Hub id of the weights to load
    revision: str | None  # Hub revision of `base`
    tokenizer: str  # where the tokenizer and its chat template come from
    adapter: Path | None = None  # adapter directory to continue training
    run: Path | None = None  # the earlier run, when model.path names one
    start_from: str | None = None  # adapter, merged or model when model.path names an earlier run
    merged_from_sha256: str | None = None  # start_from merged: the adapter sha256 its merge report records


def resolve_start(recipe: Recipe) -> Start:
    """Resolve model.path and model.start_from; raise UserError (before any model loads) when they do not fit.

    What the path names is `finetune.run.resolve.start_of`'s answer; this adds the rules for a recipe
    about to train: an adapter directory is not a model, an earlier run's revision is its own, and a
    continued adapter keeps its shape.
    """
    from finetune.run.resolve import start_of

    model = recipe.model
    run = RunDir.at(model.path)
    if not run.exists():
        _refuse_adapter_dir(model.path, "model")
    elif model.revision is not None:
        raise UserError(
            f"model.revision: {model.path} is an earlier run, whose base and revision come from its recipe; "
            "remove model.revision"
        )
    found = start_of(model, key="model")
    if found.adapter is not None and found.run is not None:
        _check_continuation(recipe, found.recipe, found.run.root, "model")
    report = None
    if found.merged is not None:
        from finetune.run.records import read_merge_report

        report = read_merge_report(found.merged)
    return Start(
        found.weights, found.revision, tokenizer=found.tokenizer, adapter=found.adapter,
        run=found.run.root if found.run is not None and run.exists() else None,
        start_from=_start_from(found) if run.exists() else None,
        merged_from_sha256=report.adapter_sha256 if report is not None else None,
    )


def _start_from(found) -> str:
    return "merged" if found.merged is not None else "adapter" if found.adapter is not None else "model"


def _refuse_adapter_dir(path: str, key: str) -> None:
    adapter = Path(path)
    if (adapter / ADAPTER_CONFIG).is_file():
        run_hint = (
            f"point {key}.path at its run directory {adapter.parent}"
            if RunDir(adapter.parent).exists()
            else "merge it into its base first (finetune merge DIR) and point model.path at the result"
        )
        raise UserError(
            f"{key}.path: {path} is an adapter, not a model; {run_hint} (start_from: adapter keeps training it)"
        )


def _check_continuation(recipe: Recipe, earlier: Recipe, run: Path, key: str) -> None:
    """A recipe that keeps training an adapter must describe that adapter as it is."""
    adapter = recipe.adapter
    if not isinstance(adapter, LoraFields):
        raise UserError(
            f"adapter.kind: is 'full', but {key}.path {run} continues an adapter; full fine-tuning needs one model: "
            f"run `finetune merge {run}` and set {key}.start_from: merged"
        )
    before = earlier.adapter
    differ = [
        f"adapter.{name}: {getattr(adapter, name)!r} here, {getattr(before, name)!r} in {RunDir(run).recipe}"
        for name in FIXED_ADAPTER_FIELDS
        if getattr(adapter, name) != getattr(before, name)
    ]
    if differ:
        raise UserError(
            f"adapter: continues the adapter of {run}, whose shape is fixed; make these settings match it "
            f"(or start a new adapter on its merged model with {key}.start_from: merged)",
            problems=differ,
        )


def load_start_adapter(model, start: Start):
    """Wrap the loaded base in the earlier run's adapter, trainable, or return the base unchanged."""
    if start.adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(start.adapter), is_trainable=True)
