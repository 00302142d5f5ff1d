"""Where training starts: a base model, or the output of an earlier `finetune train` run.

`model.path: runs/my-sft` names an earlier run (a directory with the recipe.yaml that every run writes).
Its resolved recipe says what the run trained, so we know which base an adapter belongs to, and the
usual SFT -> DPO pipeline needs no hand-copied paths: a wrong base under an adapter silently degrades
the model (unsloth #1519), so the base is never taken from the user when it can be read off the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import UserError
from finetune.recipe.schema import LoraFields, Recipe

# Adapter settings baked into the saved adapter's shape and scale: a recipe that continues an adapter
# cannot change them (dropout is a training-time setting and may differ).
FIXED_ADAPTER_FIELDS = ("r", "alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save")
MAX_DEPTH = 16  # runs started from runs started from ...; deeper means a cycle


@dataclass(frozen=True)
class Start:
    """What a run loads: base weights, optionally an adapter to keep training, and the tokenizer."""

    base: str  # local directory or Hub id of the weights to load
    revision: str | None  # Hub revision of `base`
    tokenizer: str  # where the tokenizer and its chat template come from
    adapter: Path | None = None  # adapter directory to continue training
    run: Path | None = None  # the earlier run, when model.path names one


def is_run_dir(path: str) -> bool:
    """Whether `path` is the directory of an earlier `finetune train` run."""
    return (Path(path) / "recipe.yaml").is_file()


def resolve_start(recipe: Recipe) -> Start:
    """Resolve model.path and model.start_from; raise UserError (before any model loads) when they do not fit."""
    return _resolve(recipe, key="model", depth=0, current=True)


def adapter_base(recipe: Recipe) -> Start:
    """The weights the adapter of a finished run with this recipe sits on (for `finetune merge`)."""
    return _resolve(recipe, key="model", depth=0, current=False)


def _resolve(recipe: Recipe, *, key: str, depth: int, current: bool) -> Start:
    from finetune.model.builtin import resolve_model_path

    model = recipe.model
    if not is_run_dir(model.path):
        _refuse_adapter_dir(model.path, key)
        if model.start_from != "auto":
            found = "does not exist" if not Path(model.path).exists() else "has no recipe.yaml"
            raise UserError(
                f"{key}.start_from: is '{model.start_from}', so {key}.path must be the directory of an earlier "
                f"`finetune train` run, but {model.path} {found}; train that run first (or fix the path, or "
                "remove start_from to use model.path as a base model)"
            )
        path = resolve_model_path(model.path)
        return Start(path, model.revision, tokenizer=path)
    if depth >= MAX_DEPTH:
        raise UserError(f"{key}.path: runs started from runs more than {MAX_DEPTH} deep; is there a cycle?")
    run = Path(model.path)
    if current and model.revision is not None:
        raise UserError(
            f"{key}.revision: {model.path} is an earlier run, whose base and revision come from its recipe; "
            "remove model.revision"
        )
    earlier = _read_run_recipe(run)
    trained = earlier.adapter.kind
    choice = model.start_from if model.start_from != "auto" else ("model" if trained == "full" else "adapter")
    if trained == "full":
        if choice != "model":
            raise UserError(
                f"{key}.start_from: is '{choice}', but {run} trained the full model (adapter.kind: full): it has no "
                f"adapter and nothing to merge; remove start_from to start from {run / 'model'}"
            )
        return _output_dir(run / "model", run, "config.json")
    if choice == "merged":
        return _output_dir(run / "merged", run, "config.json", hint=f"run `finetune merge {run}` first")
    _require(run / "adapter" / "adapter_config.json", run, f"did the run finish? (see {run / 'metrics.jsonl'})")
    if current:
        _check_continuation(recipe, earlier, run, key)
    base = _resolve(earlier, key=f"{run / 'recipe.yaml'}: model", depth=depth + 1, current=False)
    return Start(base.base, base.revision, tokenizer=str(run / "adapter"), adapter=run / "adapter", run=run)


def _output_dir(path: Path, run: Path, marker: str, hint: str = "") -> Start:
    _require(path / marker, run, hint or f"did the run finish? (see {run / 'metrics.jsonl'})")
    # trust_remote_code is not inherited: running a model's code needs this recipe's own opt-in.
    return Start(str(path), None, tokenizer=str(path), run=run)


def _require(path: Path, run: Path, hint: str) -> None:
    if not path.is_file():
        raise UserError(f"model.path: {run} is a run directory but {path} is missing; {hint}")


def _refuse_adapter_dir(path: str, key: str) -> None:
    adapter = Path(path)
    if (adapter / "adapter_config.json").is_file():
        run_hint = (
            f"point {key}.path at its run directory {adapter.parent}"
            if is_run_dir(str(adapter.parent))
            else "merge it into its base first (finetune merge DIR) and point model.path at the result"
        )
        raise UserError(
            f"{key}.path: {path} is an adapter, not a model; {run_hint} (start_from: adapter keeps training it)"
        )


def _read_run_recipe(run: Path) -> Recipe:
    from finetune.recipe import recipe_from_dict

    path = run / "recipe.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not a readable run recipe: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a run recipe written by `finetune train`")
    return recipe_from_dict(data, str(path))


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
        f"adapter.{name}: {getattr(adapter, name)!r} here, {getattr(before, name)!r} in {run / 'recipe.yaml'}"
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
