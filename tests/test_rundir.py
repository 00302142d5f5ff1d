"""The run directory as the seam between stages: what a path names, derived outputs and their origin,
failed starts, Ctrl-C in every phase, chained runs, one tokenizer set-up, the README quickstart twice."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.run.layout import RunDir, contract_table
from tests.conftest import REPO, invoke_cli


def write_recipe(tmp: Path, name: str, training: dict | None = None, **sections) -> Path:
    """A 2-step LoRA SFT recipe on 16 sample rows, its run under tmp/runs/NAME (`training` adds to its section)."""
    recipe = {
        "name": name,
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"path": "builtin:sample_chat.jsonl", "max_rows": 16}],
                 "eval": [{"path": "builtin:sample_eval_chat.jsonl", "max_rows": 4}]},
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"learning_rate": 5e-3, "max_steps": 2, "micro_batch_size": 4, "max_length": 96,
                     "warmup_ratio": 0.0, "logging_steps": 1, **(training or {})},
        "output": {"dir": str(tmp / "runs" / name)},
    }
    recipe.update(sections)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fake_run(parent: Path, name: str) -> Path:
    """A directory that is a run as far as locating goes (a recipe.yaml), with nothing trained in it."""
    run = parent / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: x\n")
    return run


# --- what a path names (no model loads) ------------------------------------------------------------------


def test_the_contract_table_in_docs_is_the_one_in_layout():
    text = (REPO / "docs/architecture.md").read_text(encoding="utf-8")
    assert contract_table() in text, "paste finetune.run.layout.contract_table() into docs/architecture.md"


@pytest.mark.parametrize("spec, local", [
    ("runs/typo", True), ("./model", True), ("~/models/x", True), ("/abs/path", True), ("a/b/c", True),
    ("has space", True), ("meta-llama/Llama-3.2-1B", False), ("gpt2", False), ("tiny-sft-lroa", True),
])
def test_what_looks_local(spec, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    fake_run(tmp_path / "runs", "tiny-sft-lora")
    from finetune.run.resolve import looks_local

    assert looks_local(spec) is local


@pytest.mark.parametrize("argv", [
    ["chat", "runs/tiny-sft-lra"],
    ["eval", "runs/tiny-sft-lra"],
    ["generate", "runs/tiny-sft-lra", "--prompts", "p.jsonl", "--out", "o.jsonl"],
    ["merge", "runs/tiny-sft-lra"],
    ["export", "runs/tiny-sft-lra", "--format", "vllm"],
    ["export", "runs/tiny-sft-lra", "--format", "gguf"],
    ["chat", "tiny-sft-lra"],  # a run's name, from the directory above runs/
])
def test_a_missing_run_is_no_such_directory_with_a_did_you_mean_never_a_hub_lookup(argv, tmp_path):
    fake_run(tmp_path / "runs", "tiny-sft-lora")
    fake_run(tmp_path / "runs", "other-run")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a Hub lookup would fail here with a connection error instead
    result = subprocess.run([sys.executable, "-m", "finetune", *argv], cwd=tmp_path, capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "tiny-sft-lra: no such directory; did you mean runs/tiny-sft-lora?" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "127.0.0.1" not in result.stderr


def test_an_unfinished_run_says_why_it_has_no_adapter(tmp_path):
    from finetune.run import records
    from finetune.run.resolve import resolve

    run_dir = tmp_path / "runs" / "stopped"
    path = write_recipe(tmp_path, "stopped")
    run_dir.mkdir(parents=True)
    from finetune.recipe import load_recipe

    recipe = load_recipe(path).recipe
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    provenance = records.Provenance(finetune_version="0", status=records.INTERRUPTED_BEFORE_START, started="now",
                                    command=["finetune"], recipe_file=str(path), recipe={}, data=[], packages={},
                                    hardware={})
    records.write_provenance(RunDir(run_dir).provenance, provenance)
    with pytest.raises(UserError, match="stopped before its first training step .*interrupted-before-start"):
        resolve(str(run_dir))


@pytest.mark.parametrize("command", ["merge", "chat", "export"])
def test_a_directory_with_only_a_starter_recipe_is_named_a_recipe_not_an_unfinished_run(command, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke_cli("init").returncode == 0  # writes ./recipe.yaml, as a new user's first step does
    argv = [command, "."] + (["--format", "vllm"] if command == "export" else [])
    result = invoke_cli(*argv, input="/quit\n")
    assert result.returncode == 2, result.stderr
    assert "holds recipe.yaml but is not a run directory" in result.stderr, result.stderr
    assert "finetune train recipe.yaml" in result.stderr and "did the run finish" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# --- one trained run, shared --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft(tmp_path_factory, torch_one_thread):
    """A finished 2-step LoRA run, its checkpoint saved (save_steps 2)."""
    tmp = tmp_path_factory.mktemp("rundir")
    path = write_recipe(tmp, "sft", training={"save_steps": 2})
    result = invoke_cli("train", path)
    assert result.returncode == 0, result.stderr
    return path, RunDir(tmp / "runs" / "sft")


def _scale_adapter(adapter: Path, factor: float) -> None:
    """Change the adapter's weights in place, as retraining it would (it still loads)."""
    from safetensors.torch import load_file, save_file

    file = adapter / "adapter_model.safetensors"
    save_file({k: v * factor for k, v in load_file(file).items()}, file)


@pytest.mark.slow
def test_a_stale_merge_is_refused_by_chat_and_merged_again_by_export(sft, tmp_path):
    pytest.importorskip("gguf")
    import gguf

    from finetune.run.records import GGUF_SOURCE_SHA256, content_sha256, read_merge_report

    _, source = sft
    run = RunDir(tmp_path / "copy")
    import shutil

    shutil.copytree(source.root, run.root)
    assert invoke_cli("merge", run.root).returncode == 0
    report = read_merge_report(run.merged)
    assert report.adapter_sha256 == content_sha256(run.adapter)
    again = invoke_cli("merge", run.root)
    assert again.returncode == 2 and "already holds a merge; pass --overwrite" in again.stderr

    _scale_adapter(run.adapter, 1.5)  # the adapter changes after the merge
    chat = invoke_cli("chat", run.merged.root, input="hi\n/quit\n")
    assert chat.returncode == 2 and f"{run.merged.root} is stale" in chat.stderr
    assert f"finetune merge {run.root} --overwrite" in chat.stderr
    export = invoke_cli("export", run.root, "--format", "gguf", "--quant", "f32")
    assert export.returncode == 0, export.stderr
    assert "was merged from an earlier adapter" in export.stderr and "merging again" in export.stderr
    assert read_merge_report(run.merged).adapter_sha256 == content_sha256(run.adapter) != report.adapter_sha256
    field = gguf.GGUFReader(run.gguf("f32")).fields[GGUF_SOURCE_SHA256]
    assert bytes(field.parts[field.data[0]]).decode() == content_sha256(run.adapter)
    fresh = invoke_cli("chat", run.merged.root, "--max-new-tokens", "2", input="hi\n/quit\n")
    assert fresh.returncode == 0, fresh.stderr


@pytest.mark.slow
def test_overwrite_removes_and_names_what_the_previous_run_made_and_keeps_the_users_files(sft, tmp_path):
    import shutil

    from finetune.run.checkpoints import MARKER

    path, source = sft
    run = RunDir(tmp_path / "runs" / "sft")
    shutil.copytree(source.root, run.root)
    recipe = yaml.safe_load(path.read_text())
    recipe["output"]["dir"] = str(run.root)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert invoke_cli("merge", run.root).returncode == 0
    run.gguf("f16").write_bytes(b"GGUF")  # as export names it
    (run.root / "notes.txt").write_text("mine")
    refused = invoke_cli("train", path)
    assert refused.returncode == 2 and "already holds a run; pass --resume to continue it" in refused.stderr

    result = invoke_cli("train", path, "--overwrite")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if "removed what the previous run" in x)
    for name in ("adapter/", "summary.json", "merged/", "sft-f16.gguf"):
        assert name in line, line
    assert "will not be resumed from" in result.stderr
    assert (run.root / "notes.txt").read_text() == "mine" and not run.merged.root.exists()
    assert not run.gguf("f16").exists() and (run.adapter / "adapter_config.json").is_file()
    assert (run.checkpoint(2) / MARKER).is_file()  # written again by this run


# --- Ctrl-C in every phase, and failed starts ------------------------------------------------------------

INTERRUPT_AT = """
import importlib, os, signal, sys
# Ctrl-C as in a terminal: a job started in the background (nohup, some CI runners) inherits SIGINT ignored,
# and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
module, name = sys.argv[1].rsplit(":", 1)
target = importlib.import_module(module)
original = getattr(target, name)
def interrupted(*args, **kwargs):  # a real SIGINT, delivered when the phase starts
    os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)
setattr(target, name, interrupted)
sys.argv = ["finetune", *sys.argv[2:]]
from finetune.cli import main
main()
"""

PHASES = {
    "recipe": ("finetune.recipe:load_recipe", "reading the recipe; nothing was written", None),
    "checks": ("finetune.train.checks:check_before_claim", "checking the recipe; nothing was written", None),
    "data": ("finetune.data.prepare:prepare_datasets", "preparing the data; nothing was trained; run "
             "`finetune train {recipe}` again (it replaces {run})", "interrupted-before-start"),
    "model": ("finetune.model.load:load_model", "loading the model; nothing was trained", "interrupted-before-start"),
    "saving": ("finetune.train.run:_save_outputs", "saving {run}/adapter after step 2; it may be incomplete",
               "interrupted"),
}


def interrupt(at: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INTERRUPT_AT, at, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def assert_interrupted(phase: str, result, recipe: Path, run: RunDir) -> None:
    """Exit 130 with one line naming the phase; the run directory as that phase leaves it."""
    _, says, status = PHASES[phase]
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: Ctrl-C while " + says.format(recipe=recipe.name, run=run.root)), last
    assert "Traceback" not in result.stderr
    if status is None:
        assert not run.root.exists()
    else:
        assert json.loads(run.provenance.read_text())["status"] == status


@pytest.mark.slow
@pytest.mark.parametrize("phase", [p for p in PHASES if p != "model"])  # "model": the test below
def test_ctrl_c_in_any_phase_prints_one_line_and_exits_130(phase, tmp_path):
    path = write_recipe(tmp_path, "stop")
    assert_interrupted(phase, interrupt(PHASES[phase][0], "train", path.name, cwd=tmp_path), path,
                       RunDir(tmp_path / "runs" / "stop"))


@pytest.mark.slow
def test_a_run_interrupted_before_its_first_step_has_nothing_to_resume_and_a_plain_rerun_replaces_it(tmp_path):
    """Ctrl-C while the model loads (the "model" phase of the test above), then --resume, then a plain rerun."""
    path = write_recipe(tmp_path, "again")
    run = RunDir(tmp_path / "runs" / "again")
    assert_interrupted("model", interrupt(PHASES["model"][0], "train", path.name, cwd=tmp_path), path, run)
    resumed = invoke_cli("train", path, "--resume")
    assert resumed.returncode == 2 and "stopped before its first training step" in resumed.stderr
    assert "there is nothing to resume; run the same command without --resume" in resumed.stderr
    assert "save_steps" not in resumed.stderr
    rerun = invoke_cli("train", path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"replacing {run.root}: its last run stopped before its first step (interrupted-before-start)" \
        in rerun.stderr
    assert json.loads(run.provenance.read_text())["status"] == "completed"


@pytest.mark.slow
def test_bad_rows_mark_the_run_failed_before_start_and_the_fixed_rerun_replaces_it(tmp_path):
    lines = (REPO / "finetune/resources/data/sample_chat.jsonl").read_text().splitlines()[:16]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines + ['{"messages": [{"role": "user"}]}']) + "\n")
    path = write_recipe(tmp_path, "bad", data={"train": [{"path": str(data)}]})
    first = invoke_cli("train", path)
    assert first.returncode == 2 and "train.jsonl:17" in first.stderr
    run = RunDir(tmp_path / "runs" / "bad")
    assert json.loads(run.provenance.read_text())["status"] == "failed-before-start"
    data.write_text("\n".join(lines) + "\n")
    fixed = invoke_cli("train", path)
    assert fixed.returncode == 0, fixed.stderr
    assert "its last run stopped before its first step (failed-before-start)" in fixed.stderr


# --- one tokenizer set-up for train and `finetune data` -------------------------------------------------


@pytest.mark.slow
def test_data_prepare_then_train_is_a_cache_hit_with_added_tokens(tmp_path):
    lines = (REPO / "finetune/resources/data/sample_tool_calls.jsonl").read_text().splitlines()
    data = tmp_path / "tools.jsonl"
    data.write_text("\n".join(lines[:12]) + "\n")  # a file no other test prepared: the cache starts empty for it
    path = write_recipe(
        tmp_path, "tools", model={"path": "builtin:tiny-llama", "add_special_tokens": ["<tool_call>", "</tool_call>"]},
        data={"train": [{"path": str(data)}], "chat_template": "qwen2.5"},  # the tiny ChatML has no tool role
        adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]},
        training={"max_length": 1024},  # Qwen2.5 writes the tool schemas into the system prompt (~600 tokens)
    )
    prepared = invoke_cli("data", "prepare", path)
    assert prepared.returncode == 0 and "data: preparing 1 dataset(s)" in prepared.stderr, prepared.stderr
    trained = invoke_cli("train", path)
    assert trained.returncode == 0, trained.stderr
    assert "data: cache hit, nothing to tokenise" in trained.stderr


def test_data_preview_tokenises_added_tokens_as_one_token(tmp_path):
    from finetune.cli.data import _prepare

    recipe, tokenizer, train, _, _ = _prepare(REPO / "recipes/tiny/sft_new_tokens.yaml", [])
    token = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert tokenizer.tokenize("<tool_call>") == ["<tool_call>"]
    assert any(token in row for row in train["input_ids"])


# --- chained runs -------------------------------------------------------------------------------------------


def _logits(model, tokenizer, text="What is the capital of France?"):
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("start_from", ["adapter", "merged"])
def test_a_chained_dpo_run_loads_on_what_it_trained_on(start_from, sft, tmp_path):
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.inference.load import load, resolve_source
    from finetune.model.builtin import resolve_model_path

    path, source = sft
    sft_run = RunDir(tmp_path / "runs" / "sft")
    shutil.copytree(source.root, sft_run.root)
    if start_from == "merged":
        assert invoke_cli("merge", sft_run.root).returncode == 0
    dpo_path = write_recipe(
        tmp_path, "dpo", model={"path": str(sft_run.root), "start_from": start_from},
        data={"train": [{"path": "builtin:sample_preference.jsonl", "format": "preference", "max_rows": 8}]},
        method={"kind": "dpo", "beta": 0.1},
    )
    assert invoke_cli("train", dpo_path).returncode == 0
    dpo = RunDir(tmp_path / "runs" / "dpo")
    # what the DPO run trained on: the SFT adapter, kept training (alone on the base), or the SFT merge
    base_dir = resolve_model_path("builtin:tiny-llama") if start_from == "adapter" else str(sft_run.merged.root)
    loaded = load(resolve_source(str(dpo.root)))
    assert loaded.source.base == base_dir
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), dpo.adapter).eval()
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), _logits(expected, loaded.tokenizer))

    chat = invoke_cli("chat", dpo.root, "--max-new-tokens", "4", input="What is the capital of France?\n/quit\n")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    vllm = invoke_cli("export", dpo.root, "--format", "vllm")
    assert vllm.stdout.startswith(f"vllm serve {shlex.quote(str(Path(base_dir).resolve()))} --enable-lora")
    assert invoke_cli("merge", dpo.root).returncode == 0
    assert json.loads(dpo.merged.report.read_text())["base"] == base_dir
    if start_from == "merged":  # the SFT merge is redone from another adapter: the DPO adapter lost its base
        _scale_adapter(sft_run.adapter, 2.0)
        assert invoke_cli("merge", sft_run.root, "--overwrite").returncode == 0
        refused = invoke_cli("chat", dpo.root, input="/quit\n")
        assert refused.returncode == 2 and "no longer sits on its base" in refused.stderr


# --- the README quickstart, twice ---------------------------------------------------------------------------


def readme_quickstart() -> list[list[str]]:
    """The finetune commands of the README's first setup line (the venv and pip parts are the lock's)."""
    from tests.test_readme import setup_commands

    line = setup_commands()[0]
    return [shlex.split(part)[1:] for part in (p.strip() for p in line.split("&&")) if part.startswith("finetune ")]


@pytest.mark.slow
def test_the_readme_quickstart_runs_twice_in_a_row(tmp_path, monkeypatch):
    """Exactly the README's commands, twice, in a checkout copy whose quickstart recipe trains 3 steps (the
    shipped one trains ~80, which is what a user wants and what CI cannot afford twice)."""
    commands = readme_quickstart()
    assert [c[0] for c in commands] == ["train", "merge", "eval"]
    recipe = tmp_path / commands[0][1]
    recipe.parent.mkdir(parents=True)
    text = (REPO / commands[0][1]).read_text()
    recipe.write_text(text + "  max_steps: 3\n")  # training: is the recipe's last section
    assert yaml.safe_load(recipe.read_text())["training"]["max_steps"] == 3
    monkeypatch.chdir(tmp_path)
    for attempt in range(2):
        for argv in commands:
            result = invoke_cli(*argv)
            assert result.returncode == 0, (attempt, argv, result.stderr)
    assert "removed what the previous run in runs/tiny-sft-lora made" in invoke_cli(*commands[0]).stderr
