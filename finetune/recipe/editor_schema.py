"""The JSON Schema editors check recipes against (`finetune schema`, shipped as docs/recipe.schema.json).

A recipe file is not a whole recipe: `base: other.yaml` lets it set a few keys and inherit the rest,
down to a section without its `kind` (`adapter: {r: 8}` keeps the base's LoRA). So the editor schema
is the recipe schema made permissive where inheritance reaches: no section or key is required (except
inside list items such as data.train[0], which lists replace whole), `base` is allowed at the top, and
sections match any of their kinds rather than exactly one. Unknown keys and wrong types are still
flagged. `finetune validate` checks the resolved recipe strictly.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.recipe.schema import Recipe

MARKER = "Written by `finetune schema`"  # how `schema --out` recognises a file it may overwrite


def editor_schema() -> dict[str, Any]:
    """The recipe JSON Schema for editors (see the module docstring)."""
    schema = Recipe.model_json_schema()
    in_lists = _defs_in_list_items(schema)
    _loosen(schema, keep_required=False)
    for name, definition in schema.get("$defs", {}).items():
        _loosen(definition, keep_required=name in in_lists)
    schema["properties"] = {
        "base": {
            "type": "string",
            "description": "Path of a recipe this one inherits from (relative to this file); keys set here "
            "override the base's, sections are merged, lists replaced.",
        },
        **schema["properties"],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"{MARKER}: the recipe schema for editors (sections optional, `base:` allowed). "
        "`finetune validate` checks the resolved recipe.",
        **schema,
    }


def editor_schema_text() -> str:
    """The editor schema as `finetune schema` prints it."""
    return json.dumps(editor_schema(), indent=2) + "\n"


def is_our_schema(text: str) -> bool:
    """Whether a file's text is a schema `finetune schema` wrote (and so may be overwritten)."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and str(data.get("$comment", "")).startswith(MARKER)


def _defs_in_list_items(node: Any) -> set[str]:
    """Names of the $defs that are items of a list (a whole item is always written out)."""
    found: set[str] = set()
    if isinstance(node, dict):
        items = node.get("items")
        if isinstance(items, dict) and "$ref" in items:
            found.add(items["$ref"].rsplit("/", 1)[-1])
        for value in node.values():
            found |= _defs_in_list_items(value)
    elif isinstance(node, list):
        for value in node:
            found |= _defs_in_list_items(value)
    return found


def _loosen(node: Any, *, keep_required: bool) -> None:
    """Drop `required` (unless kept) and turn exclusive unions into inclusive ones, in place."""
    if isinstance(node, dict):
        if not keep_required:
            node.pop("required", None)
        node.pop("discriminator", None)  # a partial section may leave out its `kind`
        if "oneOf" in node:
            node["anyOf"] = node.pop("oneOf")
        for key, value in node.items():
            if key != "$defs":
                _loosen(value, keep_required=keep_required)
    elif isinstance(node, list):
        for value in node:
            _loosen(value, keep_required=keep_required)
