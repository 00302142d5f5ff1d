"""Load a recipe: YAML (with `base:` inheritance), `--set` overrides, interpolation, validation.

OmegaConf does the merging and `${...}` interpolation but forgets where a value came from, so
we keep our own map from key path to "file:line" (read off PyYAML's node marks) and use it to
point every validation problem at the line the user has to edit.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import UserError
from finetune.recipe.schema import Recipe, RuleViolations

KeyPath = tuple[str | int, ...]


@dataclass
class LoadedRecipe:
    """A validated recipe with the plain data it came from and where each key was set."""

    recipe: Recipe
    source: Path | None
    origins: dict[KeyPath, str]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, merge, override, interpolate and validate a recipe; raise UserError listing every problem."""
    path = Path(path)
    data, origins = _read_with_bases(path, stack=())
    data.setdefault("name", _default_name(path))
    for item in overrides or []:
        data, origins = _apply_override(data, origins, item)
    data = _interpolate(data, origins)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = _describe_errors(exc, data, origins)
        raise UserError(
            f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the recipe",
            problems=problems,
        ) from None
    return LoadedRecipe(recipe=recipe, source=path, origins=origins)


def recipe_from_dict(data: dict[str, Any], origin: str = "<dict>") -> Recipe:
    """Validate an in-memory recipe (tests, the resolved recipe of a run) with the same messages."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = _describe_errors(exc, data, {(): origin})
        raise UserError(f"{origin}: {len(problems)} problem(s) in the recipe", problems=problems) from None


def _default_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", path.stem) or "run"


# --- reading YAML with line numbers -------------------------------------------------------------


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    if not path.is_file():
        hint = "it is a directory" if path.is_dir() else "no such file"
        raise UserError(
            f"{path}: cannot read the recipe: {hint}. Check the path (try `finetune init {path}`)."
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(
            f"{where}: YAML syntax error: {problem}. Fix the indentation or quoting there."
        ) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}:1: a recipe must be a mapping of sections (model:, data:, ...), found a "
            f"{type(data).__name__}"
        )
    origins: dict[KeyPath, str] = {(): f"{path}:1"}
    if node is not None:
        _collect_lines(node, (), path, origins)
    return data, origins


def _collect_lines(node: yaml.Node, prefix: KeyPath, path: Path, out: dict[KeyPath, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(
                    f"{path}:{line}: key '{dotted_path(prefix + (key,))}' is set twice "
                    f"(first on line {seen[key]}); keep one"
                )
            seen[key] = line
            out[prefix + (key,)] = f"{path}:{line}"
            _collect_lines(value_node, prefix + (key,), path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = f"{path}:{item.start_mark.line + 1}"
            _collect_lines(item, prefix + (i,), path, out)


def _read_with_bases(path: Path, stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in stack + (resolved,))
        raise UserError(f"{path}: `base:` recipes form a cycle: {chain}. Remove one of the `base:` keys.")
    data, origins = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data, origins
    if not isinstance(base, str):
        raise UserError(f"{origins[('base',)]}: base: expected the path of another recipe, found {base!r}")
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise UserError(
            f"{origins[('base',)]}: base: no recipe at {base_path} (relative paths are relative to "
            f"{path.parent})"
        )
    base_data, base_origins = _read_with_bases(base_path, stack + (resolved,))
    return _merge(base_data, data), {**base_origins, **origins}


def _merge(base: Any, top: Any) -> Any:
    """Deep-merge mappings; lists and scalars in `top` replace those in `base` (as OmegaConf does).

    A mapping whose `kind` differs from the base's replaces it whole: the settings of a LoRA
    adapter mean nothing to `kind: full`, so inheriting them would only produce errors.
    """
    if (
        isinstance(base, dict)
        and isinstance(top, dict)
        and base.get("kind", top.get("kind")) == top.get("kind")
    ):
        merged = dict(base)
        for key, value in top.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return top


# --- overrides and interpolation ----------------------------------------------------------------


def _apply_override(
    data: dict[str, Any], origins: dict[KeyPath, str], item: str
) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    where = f"--set {item}"
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.([A-Za-z_][\w-]*|\d+))*", key):
        raise UserError(f"{where}: expected KEY.PATH=VALUE, e.g. --set training.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = node[part] if _has(node, part) else None
        if not isinstance(nxt, dict | list):
            if isinstance(part, int):
                raise UserError(f"{where}: {'.'.join(map(str, parts[: i + 1]))} does not exist in the recipe")
            nxt = {}
            node[part] = nxt
        node = nxt
    last = parts[-1]
    if isinstance(node, list) and not (isinstance(last, int) and last < len(node)):
        raise UserError(f"{where}: {key} is not an index of that list (it has {len(node)} items)")
    node[last] = _merge(node[last], value) if _has(node, last) else value
    origins = {**origins, tuple(parts): where}
    return data, origins


def _has(node: Any, key: str | int) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and key < len(node)


def _interpolate(data: dict[str, Any], origins: dict[KeyPath, str]) -> dict[str, Any]:
    text = yaml.safe_dump(data)
    if "${" not in text:
        return data
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]+", key) if p)
        where = _origin(origins, parts)
        reason = str(getattr(exc, "msg", exc)).strip().splitlines()[0]
        raise UserError(
            f"{where}: {key}: cannot resolve interpolation: {reason}. A ${{...}} reference can name only keys "
            "written in the recipe or its base (defaults are not visible to it)."
        ) from None


# --- turning pydantic errors into messages ------------------------------------------------------


def _origin(origins: dict[KeyPath, str], path: KeyPath) -> str:
    for n in range(len(path), -1, -1):
        if path[:n] in origins:
            return origins[path[:n]]
    return "<recipe>"


def _describe_errors(exc: ValidationError, data: dict[str, Any], origins: dict[KeyPath, str]) -> list[str]:
    grouped: dict[KeyPath, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, RuleViolations):
            base = _user_path(err["loc"], data)
            for rel, msg in ctx_error.problems:
                full = base + tuple(int(p) if p.isdigit() else p for p in rel.split("."))
                grouped.setdefault(full, []).append({"type": "rule", "msg": msg})
            continue
        grouped.setdefault(_user_path(err["loc"], data), []).append(err)
    return [
        _describe(path, errs, data, origins)
        for path, errs in sorted(grouped.items(), key=_line_order(origins))
    ]


def _line_order(origins: dict[KeyPath, str]):
    def key(item: tuple[KeyPath, list]) -> tuple[str, int]:
        where = _origin(origins, item[0])
        file, _, line = where.rpartition(":")
        return (file, int(line)) if line.isdigit() else (where, 0)

    return key


def _user_path(loc: tuple, data: Any) -> KeyPath:
    """Map a pydantic error location to the key path in the user's YAML.

    Pydantic puts discriminator tags and union member names into `loc`; those are not keys the user
    wrote, so keep only the elements that exist in the data, plus a final missing/unknown key.
    """
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if _has(node, part):
            path.append(part)
            node = node[part]
        elif (
            i == len(loc) - 1
            and isinstance(node, dict)
            and isinstance(part, str)
            and not _is_member_name(part)
        ):
            path.append(part)
    return tuple(path)


def _is_member_name(part: str) -> bool:
    # union member labels pydantic adds to locations, e.g. "list[str]", "literal['all-linear']"
    return "[" in part or part in {
        "str",
        "int",
        "float",
        "bool",
        "dict",
        "list",
        "sft",
        "dpo",
        "orpo",
        "kto",
        "full",
        "lora",
        "qlora",
        "adalora",
        "ia3",
        "prompt_tuning",
        "prefix_tuning",
        "string",  # shape tags of module selections (schema._shape)
        "mapping",
    }


def _describe(
    path: KeyPath, errs: list[dict[str, Any]], data: dict[str, Any], origins: dict[KeyPath, str]
) -> str:
    where = _origin(origins, path)
    dotted = dotted_path(path) or "(top level)"
    types = {e["type"] for e in errs}
    err = errs[0]
    if "extra_forbidden" in types:
        msg = "unknown key" + _did_you_mean_key(path, data)
    elif "missing" in types:
        msg = "required key is missing" + _field_help(path, data)
    elif "union_tag_invalid" in types or "union_tag_not_found" in types:
        tags = (err.get("ctx") or {}).get("expected_tags", "")
        found = (err.get("ctx") or {}).get("tag")
        choices = re.findall(r"'([^']*)'", tags)
        msg = (
            f"expected one of {', '.join(choices)}; found {found!r}" + _suggest(str(found), choices)
            if found is not None
            else f"required key is missing (one of {', '.join(choices)})"
        )
        return f"{_origin(origins, path + ('kind',))}: {dotted}.kind: {msg}"
    elif len(errs) > 1 and all(e["type"] != "rule" for e in errs):
        expected = " or ".join(dict.fromkeys(_expectation(e).removeprefix("expected ") for e in errs))
        msg = f"expected {expected}; found {_found(errs[0])}"
    elif err["type"] == "rule":
        msg = "; ".join(e["msg"] for e in errs)
    elif err["type"] == "literal_error":
        choices = re.findall(r"'([^']*)'", (err.get("ctx") or {}).get("expected", ""))
        msg = f"expected one of {', '.join(choices)}; found {_found(err)}" + _suggest(
            str(err.get("input")), choices
        )
    else:
        msg = f"{_expectation(err)}; found {_found(err)}"
    return f"{where}: {dotted}: {msg}"


def dotted_path(path: KeyPath) -> str:
    """Key path as the user reads it: data.train[0].format."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _expectation(err: dict[str, Any]) -> str:
    msg = err["msg"]
    msg = re.sub(r"^(Value error, |Assertion failed, )", "", msg)
    msg = msg.replace("Input should be", "expected").replace("Input should have", "expected")
    return msg[0].lower() + msg[1:] if msg else msg


def _found(err: dict[str, Any]) -> str:
    value = err.get("input")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- schema lookups for did-you-mean ------------------------------------------------------------


def _model_at(path: KeyPath, data: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `path` (following `kind` discriminators)."""
    model: type[BaseModel] | None = Recipe
    node: Any = data
    for part in path:
        if model is None or isinstance(part, int):
            node = node[part] if _has(node, part) else None
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        model = _pick_model(field.annotation, node)
    return model


def _pick_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    from typing import get_args

    candidates = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    kind = node.get("kind") if isinstance(node, dict) else None
    for cand in candidates:
        tag = cand.model_fields.get("kind")
        if tag is not None and kind in get_args(tag.annotation):
            return cand
    return None


def _flatten(annotation: Any) -> list[Any]:
    from typing import get_args

    args = get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for arg in args for leaf in _flatten(arg)]


def _all_key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        for sub in {
            m for m in _flatten(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)
        }:
            out += _all_key_paths(sub, prefix + name + ".")
    return out


# Names users bring from TRL, transformers, axolotl and LLaMA-Factory, too far from ours for difflib.
PEER_NAMES = {
    "lr": "training.learning_rate",
    "num_epochs": "training.epochs",
    "num_train_epochs": "training.epochs",
    "batch_size": "training.micro_batch_size",
    "per_device_train_batch_size": "training.micro_batch_size",
    "grad_accum": "training.gradient_accumulation_steps",
    "max_seq_length": "training.max_length",
    "sequence_len": "training.max_length",
    "cutoff_len": "training.max_length",
    "lora_r": "adapter.r",
    "lora_rank": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target_modules": "adapter.target_modules",
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "torch_dtype": "model.dtype",
    "output_dir": "output.dir",
    "datasets": "data.train",
    "bf16": "training.precision",
    "load_in_4bit": "adapter.kind: qlora",
}


def _did_you_mean_key(path: KeyPath, data: dict[str, Any]) -> str:
    *parent, leaf = path
    leaf = str(leaf)
    if leaf in PEER_NAMES:
        return f"; did you mean {PEER_NAMES[leaf]}?"
    model = _model_at(tuple(parent), data)
    siblings = list(model.model_fields) if model else []
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    parent_s = dotted_path(tuple(parent))
    if close:
        return f"; did you mean {parent_s + '.' if parent_s else ''}{close[0]}?"
    owners = _variants_with_field(tuple(parent), leaf)
    if owners:
        kind = (
            (model.model_fields["kind"].annotation.__args__[0])
            if model and "kind" in model.model_fields
            else "?"
        )
        return f"; it is a setting of kind {' / '.join(owners)}, not of kind '{kind}'"
    everywhere = _all_key_paths(Recipe)
    by_leaf = {p.rsplit(".", 1)[-1]: p for p in everywhere}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if close:
        return f"; did you mean {by_leaf[close[0]]}? (it belongs in another section)"
    if siblings:
        return f"; valid keys here: {', '.join(siblings)}"
    return ""


def _variants_with_field(parent: KeyPath, leaf: str) -> list[str]:
    """Kinds of the discriminated section at `parent` that do have `leaf` (e.g. adapter.r: lora, qlora)."""
    model: Any = Recipe
    for part in parent:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        members = [m for m in _flatten(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
        if len(members) > 1:
            return (
                [
                    m.model_fields["kind"].annotation.__args__[0]
                    for m in members
                    if "kind" in m.model_fields and leaf in m.model_fields
                ]
                if part == parent[-1]
                else []
            )
        model = members[0] if members else None
    return []


def _field_help(path: KeyPath, data: dict[str, Any]) -> str:
    *parent, leaf = path
    model = _model_at(tuple(parent), data)
    field = model.model_fields.get(str(leaf)) if model else None
    return f" ({field.description})" if field is not None and field.description else ""
