"""Regenerate what is derived from the recipe schema: the reference in README.md and docs/recipe.schema.json.

Usage: python scripts/gen_recipe_reference.py   (tests/test_readme.py and tests/test_inputs.py check both)
"""

from pathlib import Path

from finetune.recipe.editor_schema import editor_schema_text
from finetune.recipe.reference import END, START, render_reference

root = Path(__file__).resolve().parent.parent
readme = root / "README.md"
text = readme.read_text(encoding="utf-8")
head, _, rest = text.partition(START)
_, _, tail = rest.partition(END + "\n")
readme.write_text(head + render_reference() + tail, encoding="utf-8")
print(f"updated {readme}")
schema = root / "docs" / "recipe.schema.json"
schema.write_text(editor_schema_text(), encoding="utf-8")
print(f"updated {schema}")
