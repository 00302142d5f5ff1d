"""Recipes: YAML run specs validated by pydantic. Light imports only (the CLI starts here)."""

from finetune.recipe.load import LoadedRecipe, load_recipe, recipe_from_dict
from finetune.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "load_recipe", "recipe_from_dict"]
