"""The command line as a user meets it: exit codes, messages, no tracebacks, no heavy imports."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli, run_cli_light

RECIPE = str(REPO / "recipes/tiny/sft_lora.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["validate", RECIPE],
        ["schema"],
        ["init", "{tmp}/new.yaml"],
        ["train", "--help"],
        ["--version"],
        ["models"],
    ],
    ids=lambda a: " ".join(a[:1]),
)
def test_light_commands_import_no_ml_stack(argv, tmp_path):
    result = run_cli_light(*(a.replace("{tmp}", str(tmp_path)) for a in argv), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY="


def test_validate_prints_resolved_recipe():
    result = run_cli("validate", RECIPE, "--set", "training.seed=3")
    assert result.returncode == 0, result.stderr
    assert "seed: 3" in result.stdout and "micro_batch_size: 16" in result.stdout


def test_three_mistakes_give_three_messages_exit_2_no_traceback_nothing_written(tmp_path):
    bad = REPO / "tests/bad_recipes/three_mistakes.yaml"
    result = run_cli("train", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(lines) == 3, result.stderr
    assert "three_mistakes.yaml:6: model.dtype" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["validate", "missing.yaml"], "missing.yaml: cannot read the recipe: no such file"),
        (["validate", RECIPE, "--set", "training.lr=1"], "unknown key; did you mean"),
        (["validate", RECIPE, "--set", "nokey"], "expected KEY.PATH=VALUE"),
        (["merge", "nowhere"], "nowhere: no such directory"),
        (["merge", "x", "--dtype", "fp8"], "--dtype: expected float32, bfloat16 or float16"),
        (["tiny-model", "out", "--arch", "gpt9"], "--arch: expected llama or qwen3"),
    ],
)
def test_bad_input_exit_2_with_message(argv, message, tmp_path):
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_error_exit_2():
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "No such command" in result.stderr


def test_schema_is_json_schema_with_descriptions(tmp_path):
    result = run_cli("schema")
    schema = json.loads(result.stdout)
    assert schema["title"] == "Recipe" and "model" in schema["properties"]
    out = tmp_path / "s.json"
    assert run_cli("schema", "--out", str(out)).returncode == 0
    assert json.loads(out.read_text()) == schema
    assert run_cli("schema", "--out", str(out)).returncode == 0  # its own earlier output is overwritten
    other = tmp_path / "notes.json"
    other.write_text("{}")
    refused = run_cli("schema", "--out", str(other))
    assert refused.returncode == 2 and "pass --force" in refused.stderr and other.read_text() == "{}"
    assert run_cli("schema", "--out", str(other), "--force").returncode == 0 and json.loads(other.read_text()) == schema


def test_init_writes_a_valid_recipe_and_never_overwrites(tmp_path):
    assert run_cli("init", "r.yaml", cwd=tmp_path).returncode == 0
    assert run_cli("validate", "r.yaml", cwd=tmp_path).returncode == 0
    before = (tmp_path / "r.yaml").read_text()
    again = run_cli("init", "r.yaml", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (tmp_path / "r.yaml").read_text() == before


def test_version():
    from finetune import __version__

    assert run_cli("--version").stdout.strip() == f"finetune {__version__}"
