"""The bad-inputs corpus (tests/bad_inputs/cases.yaml) through the command line's Typer app.

Every case must end with exit 2, name its place (key path with file:line, the --set argument, or the
data file's file:line), print no traceback, and leave the directory exactly as it was. The cases run in
this process (tests.conftest.invoke_cli: the entry point's parsing and error handling, without a new
interpreter per case); tests/test_cli.py runs refusals through the console entry point in a fresh process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, invoke_cli

CORPUS = yaml.safe_load((REPO / "tests/bad_inputs/cases.yaml").read_text(encoding="utf-8"))
DEFAULTS = CORPUS["defaults"]
GOOD = DEFAULTS["files"]["train.jsonl"].splitlines(keepends=True)[0]
COMMANDS = {"validate": ["validate"], "train": ["train"], "preview": ["data", "preview"]}


def write_case(case: dict, where: Path) -> None:
    """The case's recipe and files in `where` (defaults first, then the case's own)."""
    recipe = case.get("recipe", DEFAULTS["recipe"]) + case.get("add", "")
    files = {**DEFAULTS["files"], "recipe.yaml": recipe, **case.get("files", {})}
    for name, content in files.items():
        if content is None:
            continue
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = {"text": content}
        text = eval(content["python"], {"GOOD": GOOD}) if "python" in content else content["text"]  # noqa: S307
        # surrogateescape: a case may hold a lone surrogate on purpose (written as its escape in JSON)
        path.write_bytes(text.encode(content.get("encoding", "utf-8")))


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_corpus_is_large_and_names_a_place_in_every_case():
    ids = [case["id"] for case in CORPUS["cases"]]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert all(case["expect"] for case in CORPUS["cases"])
    kinds = {case.get("command", "validate") for case in CORPUS["cases"]}
    assert kinds == set(COMMANDS)


@pytest.mark.parametrize("case", CORPUS["cases"], ids=lambda case: case["id"])
def test_bad_input_is_refused_with_its_place_and_nothing_written(case, tmp_path, monkeypatch):
    write_case(case, tmp_path)
    before = snapshot(tmp_path)
    argv = [*COMMANDS[case.get("command", "validate")], "recipe.yaml"]
    for item in case.get("set", []):
        argv += ["--set", item]
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(*argv)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for expected in case["expect"]:
        assert expected in result.stderr, f"{expected!r} not in:\n{result.stderr[-3000:]}"
    assert snapshot(tmp_path) == before, "the command wrote or changed files"
