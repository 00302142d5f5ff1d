"""Commands print only what the user can act on: no library notices about how we call the library."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from finetune.logs import UNACTIONABLE, drop_unactionable_lines
from tests.conftest import REPO, library_notices, run_cli


def test_the_readme_quickstart_commands_print_only_our_lines(quickstart_train):
    """The README's first command line (train, merge --overwrite, eval --base), as a user runs it. With the dev
    extra installed, transformers imports DeepSpeed, which logs its accelerator guess. The GGUF export of the
    same run is checked in tests/test_gguf.py, a multi-process launch in test_distributed.py."""
    run, train = quickstart_train
    assert library_notices(train.stderr) == [] and "done: " in train.stderr
    merge = run_cli("merge", str(run), "--overwrite")
    assert merge.returncode == 0, merge.stderr
    assert library_notices(merge.stderr) == [] and "passes the merge check" in merge.stderr
    evaluated = run_cli("eval", str(run), "--base")
    assert evaluated.returncode == 0, evaluated.stderr
    assert library_notices(evaluated.stdout + evaluated.stderr) == [] and "perplexity" in evaluated.stdout


def test_adalora_training_prints_no_warning_about_its_pruned_ranks(tmp_path):
    """AdaLoRA prunes some modules to rank 0; PEFT's save (of every checkpoint and of the adapter) then warned
    about unsaved DeepSpeed/FSDP shards, which AdaLoRA never runs under."""
    result = run_cli("train", str(REPO / "recipes/tiny/sft_adalora.yaml"), "--set", "training.max_steps=3",
                     "--set", f"output.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert library_notices(result.stderr) == [], result.stderr
    ranks = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())["rank_pattern"]
    assert any(not any(mask) for mask in ranks.values()), ranks  # a module was pruned to rank 0: PEFT's case


def test_the_pruned_rank_filter_keeps_every_other_peft_warning():
    from peft.utils.warning import PeftWarning

    from finetune.adapters.hooks import ignore_pruned_ranks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_pruned_ranks()
        warnings.warn("Adapter 'default': 2 LoRA tensor(s) have invalid shape: q_proj.lora_A:(0, 128)", PeftWarning,
                      stacklevel=1)
        warnings.warn("Adapter 'default': a real problem", PeftWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Adapter 'default': a real problem"]


def _emitted(logger_name: str, message: str) -> bool:
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger(logger_name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return bool(records)


def test_only_the_unactionable_messages_are_dropped():
    drop_unactionable_lines()
    drop_unactionable_lines()  # twice is the same as once
    assert sum(type(f).__name__ == "_DropUnactionable" for f in logging.getLogger("DeepSpeed").filters) == 1
    for name, prefixes in UNACTIONABLE.items():
        for prefix in prefixes:
            assert not _emitted(name, prefix + " (rest of the message)")
        assert _emitted(name, "a real warning stays")
    assert _emitted("DeepSpeed.child", "Setting accelerator to CPU")  # only the named logger is filtered


def test_lm_eval_outside_a_git_repository_prints_no_git_error(tmp_path, monkeypatch, capfd, torch_one_thread):
    """lm-eval asks `git describe` about the working directory and let git's "fatal: not a git repository"
    through to the terminal; capfd sees what child processes write to this process's stderr."""
    pytest.importorskip("lm_eval")
    import json

    from finetune.inference.evaluate import run_eval

    monkeypatch.chdir(tmp_path)  # not inside a git repository (the checkout is one)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "capitals.jsonl"
    data.write_text(json.dumps({"q": "The capital of France is", "choices": [" Paris.", " Rome."], "label": 0}) + "\n")
    task = tmp_path / "capitals.yaml"
    task.write_text(
        f"task: finetune_quiet_capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    results = run_eval("builtin:tiny-llama", lm_eval_tasks=[str(task)], max_rows=1, log=lambda _: None)
    assert "finetune_quiet_capitals/acc" in next(iter(results.values()))
    assert "not a git repository" not in capfd.readouterr().err


def test_ddp_searches_for_unused_parameters_only_where_a_router_skips_experts():
    """transformers' default asks DDP to search for unused parameters in any PEFT model, and torch then warns
    on every rank that there were none; tests/test_distributed.py checks a real 2-process run prints nothing."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    from finetune.train.trainers import skips_parameters

    assert not skips_parameters(SimpleNamespace(config=LlamaConfig()))
    assert not skips_parameters(None)  # no model given: the dense default
    assert skips_parameters(SimpleNamespace(config=MixtralConfig())) and skips_parameters(
        SimpleNamespace(config=Qwen3MoeConfig()))
