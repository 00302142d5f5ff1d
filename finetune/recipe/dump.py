"""Write a validated recipe back out as YAML (the resolved recipe of a run)."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.recipe.schema import Recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe with every default filled in, as YAML text in schema order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_recipe(recipe: Recipe, path: Path) -> Path:
    """Write the resolved recipe atomically (a crash never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_recipe(recipe), encoding="utf-8")
    tmp.replace(path)
    return path
