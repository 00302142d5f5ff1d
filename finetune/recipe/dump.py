"""Write a validated recipe back out as YAML (the resolved recipe of a run)."""

from __future__ import annotations

import yaml

from finetune.recipe.schema import Recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe with every default filled in, as YAML text in schema order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
