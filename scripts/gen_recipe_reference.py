"""Regenerate the recipe reference in README.md from the schema: python scripts/gen_recipe_reference.py"""

from pathlib import Path

from finetune.recipe.reference import END, START, render_reference

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text(encoding="utf-8")
head, _, rest = text.partition(START)
_, _, tail = rest.partition(END + "\n")
readme.write_text(head + render_reference() + tail, encoding="utf-8")
print(f"updated {readme}")
