"""End to end through the CLI, for every adapter kind and a chained SFT -> DPO run:
train -> merge (or its documented refusal) -> export gguf where the kind allows -> one chat turn -> generate -> eval.

Each kind trains once (2 steps on 16 rows of the tiny model) and every later cell reuses that run; the
commands run in this process through the CLI's Typer app (tests.conftest.invoke_cli), so the ML imports are
paid once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.run.layout import RunDir
from tests.conftest import REPO, invoke_cli
from tests.test_rundir import write_recipe

pytestmark = pytest.mark.slow

ADAPTERS = {
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "qlora": {"kind": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
    "dora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True},
    "ia3": {"kind": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "adalora": {"kind": "adalora", "init_r": 6, "target_r": 2, "alpha": 8, "dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"]},
    "prompt_tuning": {"kind": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"kind": "prefix_tuning", "num_virtual_tokens": 4},
    "full": {"kind": "full"},
}
CHAINED = "sft_to_dpo"
KINDS = [*ADAPTERS, CHAINED]
NOT_MERGEABLE = {  # the documented refusals of `finetune merge` (and so of a GGUF export, which merges first)
    "prompt_tuning": "a prompt tuning adapter cannot be merged: it learns virtual-token embeddings",
    "prefix_tuning": "a prefix tuning adapter cannot be merged: it learns key/value prefixes",
}


def recipe(tmp: Path, name: str, adapter: dict, **sections) -> Path:
    return write_recipe(tmp, name, adapter=adapter, **sections)


def check(result, *argv):
    assert result.returncode == 0, (argv, result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, torch_one_thread):
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def runs(workdir):
    """kind -> its run directory, each trained on first use."""
    done: dict[str, RunDir] = {}

    def get(kind: str) -> RunDir:
        if kind not in done:
            if kind == "qlora":
                pytest.importorskip("bitsandbytes")
            if kind == CHAINED:
                sft = get("lora")
                path = recipe(workdir, kind, ADAPTERS["lora"], model={"path": str(sft.root)},
                              data={"train": [{"path": "builtin:sample_preference.jsonl", "format": "preference",
                                               "max_rows": 8}]},
                              method={"kind": "dpo", "beta": 0.1})
            else:
                path = recipe(workdir, kind, ADAPTERS[kind])
            check(invoke_cli("train", path), "train", kind)
            done[kind] = RunDir(workdir / "runs" / kind)
        return done[kind]

    return get


@pytest.fixture(scope="module")
def prompts(workdir):
    path = workdir / "prompts.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "What is the capital of France?"}) + "\n")
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_train(kind, runs):
    run = runs(kind)
    artifact = run.model / "config.json" if kind == "full" else run.adapter / "adapter_config.json"
    assert artifact.is_file() and json.loads(run.provenance.read_text())["status"] == "completed"


@pytest.mark.parametrize("kind", KINDS)
def test_merge(kind, runs):
    run = runs(kind)
    result = invoke_cli("merge", run.root)
    if kind in NOT_MERGEABLE:
        assert result.returncode == 2 and NOT_MERGEABLE[kind] in result.stderr
    elif kind == "full":
        assert result.returncode == 2 and "trained the full model (adapter.kind: full)" in result.stderr
        assert "nothing to merge" in result.stderr
    else:
        check(result, "merge", kind)
        report = json.loads(run.merged.report.read_text())
        assert report["max_abs_logit_diff"] < 1e-3, report


@pytest.mark.parametrize("kind", KINDS)
def test_export_gguf(kind, runs):
    pytest.importorskip("gguf")
    run = runs(kind)
    result = invoke_cli("export", run.root, "--format", "gguf", "--quant", "f16")
    if kind in NOT_MERGEABLE:
        assert result.returncode == 2 and NOT_MERGEABLE[kind] in result.stderr
        return
    check(result, "export", kind)
    assert run.gguf("f16").read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("kind", KINDS)
def test_chat_one_turn(kind, runs):
    result = check(invoke_cli("chat", runs(kind).root, "--max-new-tokens", "6",
                              input="What is the capital of France?\n/quit\n"), "chat", kind)
    assert result.stdout.strip()


@pytest.mark.parametrize("kind", KINDS)
def test_generate(kind, runs, prompts, workdir):
    out = workdir / f"generated-{kind}.jsonl"
    check(invoke_cli("generate", runs(kind).root, "--prompts", prompts, "--out", out, "--max-new-tokens", "4"),
          "generate", kind)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["id"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_eval(kind, runs):
    data = REPO / "finetune/resources/data/sample_eval_chat.jsonl"
    result = check(invoke_cli("eval", runs(kind).root, "--base", "--data", data, "--max-rows", "2",
                              "--max-new-tokens", "4"), "eval", kind)
    assert "loss" in result.stdout and "base" in result.stdout
