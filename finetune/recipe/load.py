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

# A recipe is a page of settings: these bounds are far above any real one and keep a hostile or
# corrupt file (a binary, a generated monster) from costing more than a moment.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32  # the deepest real key path is ~6 levels
MAX_VALUES = 10_000  # keys and values after aliases are expanded; a full recipe has a few hundred
# Characters YAML itself refuses (its "printable" set, YAML 1.1 5.1), found before PyYAML's reader
# trips on them with a message that names no line.
_NON_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_KEY_TAGS = ("tag:yaml.org,2002:str",)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds: nesting depth, and the size the document has once aliases expand.

    Aliases (`*name`, and merge keys `<<: *name`) are fine in moderation (PyYAML itself writes them for
    repeated values), but a "billion laughs" file of nested aliases expands to gigabytes when anything
    walks it, and an alias inside its own anchor makes a cycle. Both are refused before construction.
    """

    def __init__(self, text: str, where: str, lines: bool):
        super().__init__(text)
        self.where, self.lines, self.depth = where, lines, 0
        self.first_alias = None
        self.merged: set[int] = set()  # key nodes a merge key (<<) brought in: keys written later override them

    def _at(self, mark) -> str:
        return self.where + (_line(mark) if self.lines else "")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) and self.first_alias is None:
            self.first_alias = self.peek_event()
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise UserError(f"{self._at(self.peek_event().start_mark)}: {_TOO_DEEP}")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and self.first_alias is not None:
            _Expansion(self).measure(node, 1)
        return node

    def flatten_mapping(self, node):
        before = {id(key) for key, _ in node.value}
        super().flatten_mapping(node)
        self.merged |= {id(key) for key, _ in node.value if id(key) not in before}


_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep; a recipe is a few levels of sections and keys (is it a recipe?)"


class _Expansion:
    """Size and depth of a node tree with every alias expanded, computed once per node (aliases share nodes)."""

    def __init__(self, loader: _RecipeLoader):
        self.loader, self.sizes, self.open = loader, {}, set()

    def measure(self, node: yaml.Node, depth: int) -> tuple[int, int]:
        """(values, levels) under `node`; raises UserError past MAX_VALUES or MAX_DEPTH, or on a cycle."""
        alias = self.loader.first_alias
        where = self.loader._at(alias.start_mark)
        if id(node) in self.open:
            raise UserError(f"{where}: the YAML alias *{alias.anchor} (or another) sits inside the value it names, "
                            "which never ends; write the value out")
        if id(node) not in self.sizes:
            self.open.add(id(node))
            children = node.value if isinstance(node, yaml.SequenceNode) else (
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            measured = [self.measure(child, depth + 1) for child in children]
            self.open.discard(id(node))
            self.sizes[id(node)] = (1 + sum(n for n, _ in measured), 1 + max((d for _, d in measured), default=0))
        values, levels = self.sizes[id(node)]
        if values > MAX_VALUES:
            raise UserError(f"{where}: YAML aliases (*{alias.anchor} and others) expand this to more than "
                            f"{MAX_VALUES:,} values, far more than a recipe holds (a 'billion laughs' file?); write "
                            "the values out, or share settings between recipes with `base: other.yaml`")
        if depth + levels - 1 > MAX_DEPTH:
            raise UserError(f"{where}: through YAML aliases, {_TOO_DEEP}")
        return values, levels


def _line(mark) -> str:
    return f":{mark.line + 1}" if mark is not None else ""


def parse_yaml(text: str, where: str) -> tuple[Any, yaml.Node | None, set[int]]:
    """Parse one YAML document (a recipe, or a --set value) with the recipe loader's bounds.

    Returns the value, its node tree (for line numbers) and the ids of key nodes a merge key brought
    in. `where` prefixes every message: "recipe.yaml" (a line number is added) or "--set KEY=VALUE".
    """
    bad = _NON_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        raise UserError(
            f"{where}{'' if where.startswith('--set') else f':{line}'}: control character "
            f"U+{ord(bad.group()):04X} at column {column}; a recipe is plain text: remove it "
            "(or write it as an escape inside double quotes, e.g. \"\\t\")"
        )
    in_file = not where.startswith("--set")
    loader = _RecipeLoader(text, where, lines=in_file)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node, loader.merged
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if not in_file:  # not YAML (e.g. a Jinja template): the text itself is the value
            return text, None, set()
        raise UserError(
            f"{where}{_line(mark)}: YAML syntax error: {problem}. Fix the indentation or quoting there."
        ) from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    if not path.is_file():
        hint = "it is a directory" if path.is_dir() else "no such file"
        raise UserError(
            f"{path}: cannot read the recipe: {hint}. Check the path (try `finetune init {path}`)."
        )
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise UserError(
            f"{path}: {size:,} bytes is too large for a recipe (the limit is {MAX_RECIPE_BYTES:,}); is it a data "
            "file? Data files are named in data.train[].path, not given as the recipe"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte {exc.start + 1} of the file); re-save the recipe as UTF-8"
        ) from None
    data, node, merged = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}:1: a recipe must be a mapping of sections (model:, data:, ...), found a "
            f"{type(data).__name__}"
        )
    origins: dict[KeyPath, str] = {(): f"{path}:1"}
    if node is not None:
        _collect_lines(node, (), path, origins, merged)
    return data, origins


def _collect_lines(
    node: yaml.Node, prefix: KeyPath, path: Path, out: dict[KeyPath, str], merged: set[int] = frozenset()
) -> None:
    """Record the line of every key path (aliases followed; bounded by the loader) and refuse repeated keys."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        seen_nodes: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _KEY_TAGS:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a list or mapping"
                raise UserError(
                    f"{path}:{line}: {dotted_path(prefix) or '(top level)'}: key {shown!r} is not a name "
                    "(YAML reads it as a number, boolean, null or collection); quote it, e.g. \"yes\":"
                )
            key = key_node.value
            if key in seen and id(key_node) not in merged and id(seen_nodes[key]) not in merged:
                raise UserError(
                    f"{path}:{line}: key '{dotted_path(prefix + (key,))}' is set twice "
                    f"(first on line {seen[key]}); keep one"
                )
            seen[key], seen_nodes[key] = line, key_node
            out[prefix + (key,)] = f"{path}:{line}"
            _collect_lines(value_node, prefix + (key,), path, out, merged)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = f"{path}:{item.start_mark.line + 1}"
            _collect_lines(item, prefix + (i,), path, out, merged)


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


MAX_OVERRIDE_CHARS = 65536
_KEY_PATH = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*|\.\d+|\[\d+\])*")
_KEY_PART = re.compile(r"[A-Za-z_][\w-]*|\d+")


def parse_key_path(key: str) -> KeyPath | None:
    """`data.train[0].path` (or `data.train.0.path`) as a key path; None if it is not one."""
    if not _KEY_PATH.fullmatch(key):
        return None
    return tuple(int(p) if p.isdigit() else p for p in _KEY_PART.findall(key))


def _apply_override(
    data: dict[str, Any], origins: dict[KeyPath, str], item: str
) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    where = f"--set {item}" if len(item) <= 200 else f"--set {item[:200]}..."
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = parse_key_path(key) if sep else None
    if parts is None:
        raise UserError(
            f"{where}: expected KEY.PATH=VALUE, e.g. --set training.learning_rate=1e-4 or "
            "--set data.train[0].path=train.jsonl"
        )
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise UserError(f"{where}: the value is {len(raw):,} characters long; put long values in the recipe file")
    value = parse_yaml(raw, where)[0] if raw.strip() else ""
    node: Any = data
    for i, part in enumerate(parts):
        _check_step(node, parts[: i + 1], where)
        if i == len(parts) - 1:
            break
        nxt = node[part] if _has(node, part) else None
        if not isinstance(nxt, dict | list):
            if isinstance(parts[i + 1], int):
                raise UserError(
                    f"{where}: {dotted_path(parts[: i + 1])} is not a list in the recipe; set the whole list "
                    f"instead, e.g. --set {dotted_path(parts[: i + 1])}=[...]"
                )
            nxt = {}
            node[part] = nxt
        node = nxt
    last = parts[-1]
    node[last] = _merge(node[last], value) if _has(node, last) else value
    # Everything this argument set is reported at it, not at the recipe line it replaced.
    origins = {p: w for p, w in origins.items() if p[: len(parts)] != parts or _has_path(node[last], p[len(parts) :])}
    origins[parts] = where
    for sub in _paths(value):
        origins[parts + sub] = where
    return data, origins


def _check_step(node: Any, path: KeyPath, where: str) -> None:
    """Refuse an index into a mapping, a name inside a list, and an index past a list's end."""
    part, parent = path[-1], dotted_path(path[:-1])
    if isinstance(node, list) and not isinstance(part, int):
        raise UserError(f"{where}: {parent} is a list; name an item by its index, e.g. {parent}[0].{part}")
    if isinstance(node, dict) and isinstance(part, int):
        raise UserError(f"{where}: {dotted_path(path)} does not exist: {parent} is a section, not a list")
    if isinstance(node, list) and part >= len(node):
        raise UserError(
            f"{where}: {dotted_path(path)} does not exist: {parent} is a list of {len(node)} item(s); "
            f"to add one, set the whole list: --set {parent}=[...]"
        )


def _paths(value: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for k, v in items for p in (prefix + (k,), *_paths(v, prefix + (k,)))]


def _has_path(value: Any, path: KeyPath) -> bool:
    for part in path:
        if not _has(value, part):
            return False
        value = value[part]
    return True


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
            f"expected one of {', '.join(choices)}; found {found!r}" + did_you_mean(str(found), choices)
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
        choices = _choices((err.get("ctx") or {}).get("expected", ""))
        msg = f"expected one of {', '.join(choices)}; found {_found(err)}" + did_you_mean(
            str(err.get("input")), choices
        )
    else:
        msg = f"{_expectation(err)}; found {_found(err)}"
    return f"{where}: {dotted}: {msg}"


def _choices(expected: str) -> list[str]:
    """The choices of pydantic's "'a', 'b' or 'c'" (or "1, 2 or 3") as plain words."""
    items = re.split(r", | or ", expected)
    return [item.strip().strip("'\"") for item in items if item.strip()]


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


def did_you_mean(word: str, choices: list[str]) -> str:
    """" (did you mean 'x'?)" for the closest choice, or ""."""
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
