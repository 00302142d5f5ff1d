"""Check which modules an adapter would touch, on the model's skeleton, before anything loads or trains.

The model is built on the meta device from its config: every module exists with its name and class,
no weight is allocated or read, so this takes about a second even for a 70B model. Each name in the
recipe is matched the way PEFT matches it (tests compare the prediction with the adapter PEFT builds),
and every name that matches nothing is reported at once: PEFT itself errors only when *no* name
matches, so a typo next to a correct name silently trains less than the user asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from finetune.errors import UserError
from finetune.recipe.schema import (
    FullAdapter,
    IA3Adapter,
    LayerFields,
    Recipe,
    TargetFields,
    TargetRegex,
)

# PEFT's rule for the layer index of a module name: the first numbered segment ("model.layers.3.mlp" -> 3).
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
_SHOWN = 12  # names listed in one message


@dataclass(frozen=True)
class ModelLayout:
    """The module tree of a model, read off its meta-device skeleton."""

    modules: dict[str, str]  # module name -> class name, in model order ("" is the root)
    holders: tuple[str, ...]  # names of modules that hold parameters themselves (q_proj, norm, ...)
    adaptable: dict[str, tuple[str, ...]]  # adapter kind -> names of modules it can wrap
    num_layers: int | None
    hidden_size: int | None
    input_embeddings: str | None
    output_embeddings: str | None
    tied_embeddings: bool


def read_layout(model_path: str, recipe: Recipe) -> ModelLayout:
    """Build the model on the meta device (no weights) and record its module names and classes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    section = recipe.model
    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=section.revision, trust_remote_code=section.trust_remote_code
        )
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model.path: cannot read the model config of {model_path!r}: {exc}") from None
    nn = torch.nn
    # The module classes each PEFT method can wrap (PEFT raises "Target module ... is not supported" otherwise).
    wrappable = {
        "lora": (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D, nn.MultiheadAttention),
        "adalora": (nn.Linear, Conv1D),
        "ia3": (nn.Linear, nn.Conv2d, nn.Conv3d, Conv1D),
    }
    named = list(model.named_modules())
    text = config.get_text_config()
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return ModelLayout(
        modules={name: type(module).__name__ for name, module in named},
        holders=tuple(name for name, module in named if any(True for _ in module.parameters(recurse=False))),
        adaptable={
            kind: tuple(name for name, module in named if isinstance(module, classes))
            for kind, classes in wrappable.items()
        },
        num_layers=getattr(text, "num_hidden_layers", None),
        hidden_size=getattr(text, "hidden_size", None),
        input_embeddings=next((n for n, m in named if m is inputs), None),
        output_embeddings=next((n for n, m in named if m is outputs), None),
        tied_embeddings=outputs is not None and inputs is not None and outputs.weight is inputs.weight,
    )


def name_matches(module: str, name: str) -> bool:
    """PEFT's rule for a target name: the module's full name is it, or ends in '.<name>'."""
    return module == name or module.endswith("." + name)


def layer_index(module: str) -> int | None:
    """The decoder layer a module belongs to, as PEFT reads it (None outside the layers)."""
    match = _LAYER_INDEX.match(module)
    return int(match["idx"]) if match else None


def select(names: Iterable[str], selection, layers: list[int] | None = None) -> list[str]:
    """The module names a selection (list of names or TargetRegex) picks, optionally within some layers."""
    if isinstance(selection, TargetRegex):
        return [n for n in names if re.fullmatch(selection.regex, n)]
    picked = [n for n in names if any(name_matches(n, t) for t in selection)]
    return picked if layers is None else [n for n in picked if layer_index(n) in layers]


def saved_by(modules_to_save: list[str], module: str) -> bool:
    """PEFT's rule for wrapping a module to train in full: its name ends with a modules_to_save entry."""
    return any(module.endswith(m) for m in modules_to_save)


def excluded_as_saved(modules_to_save: list[str], module: str) -> bool:
    """PEFT's rule for leaving a target out because modules_to_save names it (a whole name part)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module) for m in modules_to_save)


def check_selection(recipe: Recipe, layout: ModelLayout, model_path: str) -> None:
    """Raise one UserError listing every module name in the adapter section that does not fit the model."""
    adapter = recipe.adapter
    problems: list[str] = []
    if isinstance(adapter, TargetFields):
        problems += _target_problems(adapter, layout)
        problems += _names_problems(
            "adapter.modules_to_save", adapter.modules_to_save, layout, suffix=True
        )
    if isinstance(adapter, IA3Adapter):
        targets = (
            _all_linear(layout)
            if adapter.target_modules == "all-linear"
            else select(_adaptable(adapter, layout), adapter.target_modules)
        )
        # IA3's rule for a feedforward module: a target whose name ends with the entry
        missing = [f for f in adapter.feedforward_modules if not any(t.endswith(f) for t in targets)]
        if missing:
            problems.append(f"adapter.feedforward_modules: {_quoted(missing)} {_match(missing)} no target module")
    if isinstance(adapter, FullAdapter) and adapter.trainable_modules is not None:
        problems += _names_problems("adapter.trainable_modules", adapter.trainable_modules, layout, suffix=False)
    problems += _new_token_problems(recipe, layout)
    if problems:
        raise UserError(f"{model_path}: the recipe names modules that do not fit this model", problems=problems)


def _adaptable(adapter, layout: ModelLayout) -> tuple[str, ...]:
    kind = {"adalora": "adalora", "ia3": "ia3"}.get(adapter.kind, "lora")
    return layout.adaptable[kind]


def _all_linear(layout: ModelLayout) -> list[str]:
    # PEFT's 'all-linear': every Linear/Conv1D but the output head.
    return [n for n in layout.adaptable["adalora"] if n != layout.output_embeddings]


def _target_problems(adapter: TargetFields, layout: ModelLayout) -> list[str]:
    if adapter.target_modules == "all-linear":
        return []
    layers = adapter.layer_indices if isinstance(adapter, LayerFields) else None
    problems = []
    if layers is not None and layout.num_layers is not None:
        outside = [i for i in layers if i >= layout.num_layers]
        if outside:
            problems.append(
                f"adapter.layers: {outside} out of range; the model has {layout.num_layers} layers "
                f"(0-{layout.num_layers - 1})"
            )
    names = list(layout.modules)
    adaptable = set(_adaptable(adapter, layout))
    selections = (
        [(f"regex {adapter.target_modules.regex!r}", adapter.target_modules)]
        if isinstance(adapter.target_modules, TargetRegex)
        else [(repr(t), [t]) for t in adapter.target_modules]
    )
    unmatched, outside_layers, unsupported, also_saved = [], [], [], []
    for label, selection in selections:
        anywhere = select(names, selection)
        picked = select(names, selection, layers)
        if not anywhere:
            unmatched.append(label)
        elif not picked:
            outside_layers.append(label)
        elif all(excluded_as_saved(adapter.modules_to_save, n) for n in picked):
            also_saved.append(label)
        elif [n for n in picked if n not in adaptable and not excluded_as_saved(adapter.modules_to_save, n)]:
            classes = sorted({layout.modules[n] for n in picked if n not in adaptable})
            unsupported.append(f"{label} ({', '.join(classes)})")
    wrappable = _leaf_summary(_adaptable(adapter, layout))
    if unmatched:
        problems.append(
            f"adapter.target_modules: {', '.join(unmatched)} {_match(unmatched)} no module; "
            f"modules this adapter can wrap: {wrappable}"
        )
    if outside_layers:
        problems.append(
            f"adapter.target_modules: {', '.join(outside_layers)} {_match(outside_layers)} only modules outside "
            f"adapter.layers {layers}"
        )
    if unsupported:
        problems.append(
            f"adapter.target_modules: {', '.join(unsupported)} {_match(unsupported)} modules that adapter.kind "
            f"{adapter.kind} cannot wrap; name the layers inside them: {wrappable}"
        )
    if also_saved:
        problems.append(
            f"adapter.target_modules: {', '.join(also_saved)} {_match(also_saved)} only modules listed in "
            "adapter.modules_to_save, which PEFT trains in full and does not adapt; remove them from one of the two"
        )
    return problems


def _names_problems(key: str, selection, layout: ModelLayout, *, suffix: bool) -> list[str]:
    """Unmatched names of modules_to_save (PEFT: suffix match) or trainable_modules (target rule)."""
    names = [n for n in layout.modules if n]
    if isinstance(selection, TargetRegex):
        return [] if select(names, selection) else [f"{key}: regex {selection.regex!r} matches no module"]
    missing = [m for m in selection if not any((saved_by([m], n) if suffix else name_matches(n, m)) for n in names)]
    if not missing:
        return []
    return [
        f"{key}: {_quoted(missing)} {_match(missing)} no module; modules with weights in this model: "
        f"{_leaf_summary(layout.holders)}"
    ]


def _new_token_problems(recipe: Recipe, layout: ModelLayout) -> list[str]:
    """New token rows start untrained: the embeddings that hold them must be trained."""
    if not recipe.model.add_special_tokens:
        return []
    needed = [layout.input_embeddings]
    if not layout.tied_embeddings:
        needed.append(layout.output_embeddings)
    needed = [n for n in needed if n]
    adapter = recipe.adapter
    if isinstance(adapter, FullAdapter):
        if adapter.trainable_modules is None:
            return []
        trained = select(list(layout.modules), adapter.trainable_modules)
        frozen = [n for n in needed if not any(n == t or n.startswith(t + ".") for t in trained)]
        fix = "add them to adapter.trainable_modules"
    elif isinstance(adapter, TargetFields):
        frozen = [n for n in needed if not saved_by(adapter.modules_to_save, n)]
        fix = "add them to adapter.modules_to_save"
    else:  # prompt learning: refused by the schema already
        return []
    if not frozen:
        return []
    leaves = [n.rsplit(".", 1)[-1] for n in frozen]
    return [
        f"model.add_special_tokens: the new tokens' rows in {_quoted(leaves)} would never be trained; {fix} "
        f"(e.g. [{', '.join(leaves)}])"
    ]


def _leaf_summary(names: Iterable[str]) -> str:
    """Distinct last name parts, in model order, plus one full name as an example: 'q_proj, k_proj (e.g. ...)'."""
    names = [n for n in names if n]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()))
    shown = ", ".join(leaves[:_SHOWN]) + (f", ... ({len(leaves)} in all)" if len(leaves) > _SHOWN else "")
    example = next((n for n in names if layer_index(n) is not None), names[0] if names else "")
    return f"{shown} (full names look like {example})" if example else shown


def _match(names: list) -> str:
    return "matches" if len(names) == 1 else "match"


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)
