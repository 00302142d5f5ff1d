"""Recipe loading and validation: every shipped recipe is valid, every bad one is reported precisely."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.recipe import load_recipe
from tests.conftest import REPO

SHIPPED = sorted((REPO / "recipes").rglob("*.yaml")) + [REPO / "finetune/resources/starter.yaml"]
BAD = sorted((REPO / "tests/bad_recipes").glob("*.yaml"))


def problems_of(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return info.value.problems or [str(info.value)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path).recipe
    assert recipe.model.path and recipe.data.train


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_recipe_messages_name_key_path_and_line(path):
    """Each `# expect: LINE: KEY.PATH: TEXT` comment must match one reported problem, and no others."""
    expected = re.findall(r"^# expect: (\d+): (\S+): (.+)$", path.read_text(), flags=re.M)
    assert expected, f"{path.name} declares no expectations"
    problems = problems_of(path)
    for line, key, text in expected:
        prefix = f"{path}:{line}: {key}: "
        assert any(p.startswith(prefix) and text in p for p in problems), (
            f"no problem starting {prefix!r} containing {text!r} in:\n" + "\n".join(problems)
        )
    assert len(problems) == len(expected), "\n".join(problems)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "model: {path: builtin:tiny-llama}\ndata: {train: [{path: builtin:sample_chat.jsonl}]}\nmethod: {kind: sft}\n"


def test_override_sets_value_and_unknown_override_suggests(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert load_recipe(path, ["training.learning_rate=3e-4"]).recipe.training.learning_rate == 3e-4
    assert load_recipe(path, ["adapter.target_modules=[q_proj, v_proj]"]).recipe.adapter.target_modules == [
        "q_proj",
        "v_proj",
    ]
    (problem,) = problems_of(path, ["training.lerning_rate=1e-4"])
    assert problem.startswith("--set training.lerning_rate=1e-4: training.lerning_rate: unknown key")
    assert "did you mean training.learning_rate?" in problem


def test_override_needs_key_and_value(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    with pytest.raises(UserError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["training.learning_rate"])


def test_base_inheritance_and_kind_switch(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "adapter: {kind: lora, r: 8}\ntraining: {epochs: 3, seed: 7}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nadapter: {kind: full}\ntraining: {epochs: 1}\n")
    recipe = load_recipe(child).recipe
    assert recipe.adapter.kind == "full"  # the LoRA settings of the base were dropped, not merged in
    assert (recipe.training.epochs, recipe.training.seed) == (1, 7)
    assert recipe.name == "child"


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n" + MINIMAL)
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(UserError, match="form a cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_base_names_the_line(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "base: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"r.yaml:4: base: no recipe at .*nowhere.yaml"):
        load_recipe(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "training:\n  epochs: [1\n  seed: 3\n")
    with pytest.raises(UserError, match=r"r.yaml:\d+: YAML syntax error"):
        load_recipe(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "training: {seed: 1}\ntraining: {seed: 2}\n")
    with pytest.raises(UserError, match=r"r.yaml:5: key 'training' is set twice \(first on line 4\)"):
        load_recipe(path)


def test_missing_file():
    with pytest.raises(UserError, match="no such file"):
        load_recipe("/nonexistent/recipe.yaml")


def test_interpolation_resolves_and_bad_reference_is_reported(tmp_path):
    path = write(
        tmp_path, "r2.yaml", MINIMAL + "training: {seed: 5}\noutput: {dir: 'out/${training.seed}'}\n"
    )
    assert load_recipe(path).recipe.run_dir == "out/5"
    path = write(tmp_path, "r3.yaml", MINIMAL + "output: {dir: 'out/${training.sed}'}\n")
    with pytest.raises(
        UserError, match=r"r3.yaml:4: output.dir: cannot resolve interpolation: .*'training.sed'"
    ):
        load_recipe(path)


def test_run_dir_defaults_to_runs_name(tmp_path):
    path = write(tmp_path, "my-recipe.yaml", MINIMAL)
    assert load_recipe(path).recipe.run_dir == "runs/my-recipe"


def test_every_schema_field_has_a_description():
    from finetune.recipe.schema import Recipe

    schema = Recipe.model_json_schema()
    missing = [
        f"{name}.{prop}"
        for name, definition in {"Recipe": schema, **schema.get("$defs", {})}.items()
        for prop, spec in definition.get("properties", {}).items()
        if not spec.get("description")
    ]
    assert not missing
