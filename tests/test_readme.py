"""The README stays true: its test command is what CI runs, its recipe reference matches the schema."""

from __future__ import annotations

import re

from finetune.recipe.reference import render_reference
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_opens_with_two_setup_commands():
    quickstart, tests = setup_commands()[:2]
    assert "finetune train recipes/tiny/sft_lora.yaml" in quickstart and "finetune merge" in quickstart
    assert quickstart.index("torch==2.13.0") < quickstart.index("pip install -c constraints.txt -e .")
    assert "pytest" in tests


def test_readme_commands_install_from_the_lock():
    for command in setup_commands()[:2]:
        installs = [part for part in command.split("&&") if "pip install" in part and "torch==" not in part]
        assert installs and all("-c constraints.txt" in part for part in installs), command
    locked = (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert "torch==2.13.0" in locked, "the lock names torch without a local label (+cpu), so CUDA builds satisfy it"


def test_ci_runs_the_readme_test_command():
    assert setup_commands()[1] in (REPO / ".ci/run").read_text(encoding="utf-8")


def test_recipe_reference_matches_schema():
    assert render_reference() in README, "run: python scripts/gen_recipe_reference.py"
