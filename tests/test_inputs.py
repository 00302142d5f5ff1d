"""What a recipe points at, and the refusals that must come before anything heavy loads.

The corpus in tests/bad_inputs covers the messages; these tests cover what it cannot: that cheap
refusals import no ML library, that good inputs (a BOM, a Hub id online) pass, the editor schema,
the help screens, and what eval data without eval_steps does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.recipe import load_recipe
from finetune.run.layout import RunDir
from tests.conftest import REPO, invoke_cli, run_cli

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "deepspeed", "accelerate")
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))
MINIMAL = {
    "model": {"path": "builtin:tiny-llama"},
    "data": {"train": [{"path": "builtin:sample_chat.jsonl"}]},
    "method": {"kind": "sft"},
}


def write(tmp_path: Path, name: str = "r.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**MINIMAL, "output": {"dir": str(tmp_path / "runs" / "r")}, **sections}))
    return path


def run_in_process(argv: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    """Run the CLI in a fresh interpreter; return its exit code, stderr and the heavy modules it imported."""
    code = (
        "import sys\n"
        f"sys.argv = ['finetune', *{argv!r}]\n"
        "from finetune.cli import main\n"
        "try:\n    main()\n    rc = 0\nexcept SystemExit as e:\n    rc = e.code\n"
        # a module set to None is one finetune.train.startup hid from the process, not an import
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if sys.modules.get(m) is not None))\n"
        "print(f'RC={rc}')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=os.environ.copy())
    lines = out.stdout.strip().splitlines()
    heavy = lines[-2].removeprefix("HEAVY=")
    return int(lines[-1].removeprefix("RC=")), out.stderr, [m for m in heavy.split(",") if m]


# --- cheap refusals come before the heavy imports -----------------------------------------------


def test_a_run_dir_that_holds_a_run_is_refused_before_any_ml_import(tmp_path):
    path = write(tmp_path)
    run = RunDir(tmp_path / "runs" / "r")
    run.root.mkdir(parents=True)
    run.recipe.write_text("name: earlier\n")
    run.provenance.write_text('{"status": "completed"}\n')  # a run wrote it (a recipe.yaml alone is the user's)
    code, stderr, heavy = run_in_process(["train", str(path)], tmp_path)
    assert code == 2 and "already holds a run" in stderr, stderr
    assert heavy == []
    assert sorted(p.name for p in run.root.iterdir()) == sorted([run.recipe.name, run.provenance.name])  # no lock


def test_resume_with_a_changed_recipe_is_refused_before_any_ml_import(tmp_path):
    from finetune.redact import redact
    from finetune.run.checkpoints import commit_checkpoint
    from finetune.run.provenance import hash_data

    path = write(tmp_path, training={"learning_rate": 1e-3})
    recipe = load_recipe(path).recipe
    checkpoint = tmp_path / "runs" / "r" / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    earlier = redact(recipe.model_dump(mode="json"))
    earlier["training"]["learning_rate"] = 2e-3
    commit_checkpoint(checkpoint, step=5, epoch=0.1, samples=20, recipe_yaml=yaml.safe_dump(earlier),
                      data=hash_data(recipe))
    code, stderr, heavy = run_in_process(["train", str(path), "--resume"], tmp_path)
    assert code == 2 and "training.learning_rate: 0.002 -> 0.001" in stderr and "--force" in stderr, stderr
    assert heavy == []


def test_an_offline_hub_id_is_refused_by_chat_before_any_ml_import(tmp_path):
    code, stderr, heavy = run_in_process(["chat", "some-org/some-model"], tmp_path)
    assert code == 2 and "offline mode is on (HF_HUB_OFFLINE=1)" in stderr and "--local-dir" in stderr
    assert "internet connection" not in stderr and heavy == []


# --- good inputs pass; validate never uses the network --------------------------------------------


def test_validate_lists_a_hub_id_as_not_checked_when_online(tmp_path):
    path = write(tmp_path, model={"path": "some-org/some-model"})
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-m", "finetune", "validate", str(path)], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "# note: model.path: some-org/some-model: Hub id, not checked" in result.stderr


def test_byte_order_marks_are_not_part_of_the_data(tmp_path):
    from finetune.data.sources import read_rows
    from finetune.recipe.schema import DatasetSpec

    (tmp_path / "excel.csv").write_bytes("prompt,completion\nWhat is 2+2?,4\n".encode("utf-8-sig"))
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "notepad.jsonl").write_bytes((json.dumps(row) + "\n").encode("utf-8-sig"))
    [csv_row] = read_rows(DatasetSpec(path=str(tmp_path / "excel.csv"), format="prompt_completion"))
    assert csv_row.data == {"prompt": "What is 2+2?", "completion": "4"}
    assert csv_row.where.endswith("excel.csv:2")
    [json_row] = read_rows(DatasetSpec(path=str(tmp_path / "notepad.jsonl")))
    assert json_row.data == row
    path = write(tmp_path, data={"train": [{"path": "excel.csv", "format": "prompt_completion"}]})
    assert run_cli("validate", str(path), cwd=tmp_path).returncode == 0


def test_set_accepts_the_indexed_form_errors_print(tmp_path):
    chat = {"path": "builtin:sample_chat.jsonl"}
    path = write(tmp_path, data={"train": [chat, chat]})
    recipe = load_recipe(path, ["data.train[1].max_rows=3", "data.train.0.weight=2"]).recipe
    assert recipe.data.train[1].max_rows == 3 and recipe.data.train[0].weight == 2


# --- the editor schema --------------------------------------------------------------------------


def test_shipped_schema_is_what_finetune_schema_prints():
    printed = run_cli("schema").stdout
    assert (REPO / "docs/recipe.schema.json").read_text(encoding="utf-8") == printed, (
        "run: python scripts/gen_recipe_reference.py"
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_names_the_schema_and_passes_it(path):
    import jsonschema

    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema="), f"{path} does not name the editor schema"
    schema_path = (path.parent / first.split("=", 1)[1].strip()).resolve()
    assert schema_path == (REPO / "docs/recipe.schema.json").resolve()
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), schema)


def test_editor_schema_still_flags_unknown_keys_and_wrong_types():
    import jsonschema

    from finetune.recipe.editor_schema import editor_schema

    checker = jsonschema.Draft202012Validator(editor_schema())
    checker.validate({"base": "x.yaml", "adapter": {"r": 8}, "method": {"beta": 0.2}})  # partial sections
    assert not checker.is_valid({"trainig": {}})
    assert not checker.is_valid({"training": {"epochs": "three"}})
    assert not checker.is_valid({"data": {"train": [{"format": "messages"}]}})  # a list item is whole: path needed


# --- help screens -------------------------------------------------------------------------------


def _commands():
    import typer

    from finetune.cli import app
    from finetune.cli.app import tidy_help

    root = tidy_help(typer.main.get_command(app))
    out = []
    for name, command in root.commands.items():
        subs = getattr(command, "commands", None)
        out += [([name, sub], c) for sub, c in subs.items()] if subs else [([name], command)]
    return out


@pytest.mark.parametrize("argv", [a for a, _ in _commands()], ids=lambda a: " ".join(a))
def test_help_screens_describe_every_option_without_type_noise(argv):
    command = dict((tuple(a), c) for a, c in _commands())[tuple(argv)]
    undescribed = [p.name for p in command.params if not (p.help or "").strip()]
    assert not undescribed, f"options without help: {undescribed}"
    result = run_cli(*argv, "--help")
    assert result.returncode == 0
    for noise in ("<bool>", "<list[", "<int", "<str>", "<path>", "<float", "--n "):
        assert noise not in result.stdout, (noise, result.stdout)
    assert "Examples" in result.stdout and "finetune " + argv[0] in result.stdout.split("Examples", 1)[1]


# --- eval data without eval_steps -----------------------------------------------------------------


def test_eval_data_without_eval_steps_evaluates_at_each_epoch_end(tmp_path):
    from types import SimpleNamespace

    from finetune.train.trainers import training_args

    path = write(tmp_path, data={**MINIMAL["data"], "eval": [{"path": "builtin:sample_eval_chat.jsonl"}]})
    recipe = load_recipe(path).recipe
    precision = SimpleNamespace(bf16=False, fp16=False, device="cpu")  # what resolve_precision gives on a CPU
    assert training_args(recipe, precision, tmp_path, has_eval=True)["eval_strategy"] == "epoch"
    stepped = load_recipe(path, ["training.eval_steps=5"]).recipe
    assert training_args(stepped, precision, tmp_path, has_eval=True)["eval_strategy"] == "steps"
    assert training_args(load_recipe(write(tmp_path, "plain.yaml")).recipe, precision, tmp_path,
                         has_eval=False)["eval_strategy"] == "no"


@pytest.mark.slow
def test_lm_eval_task_offline_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    result = invoke_cli("eval", "builtin:tiny-llama", "--lm-eval", "arc_easy", "--max-rows", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "--lm-eval arc_easy: the task downloads its dataset from the Hugging Face Hub" in line
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in line
