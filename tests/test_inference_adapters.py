"""chat / generate / eval for every adapter kind PEFT runs, alone and switching; held-out eval rows; added tokens."""

from __future__ import annotations

import pytest

from tests.conftest import invoke_cli
from tests.test_train import make_recipe, train

pytestmark = pytest.mark.slow

KINDS = {
    "ia3": {"kind": "ia3"},
    "adalora": {"kind": "adalora", "init_r": 8, "target_r": 4},
    "prompt_tuning": {"kind": "prompt_tuning", "num_virtual_tokens": 8},
    "prefix_tuning": {"kind": "prefix_tuning", "num_virtual_tokens": 8},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torch_one_thread):
    tmp = tmp_path_factory.mktemp("kinds")
    short = {"max_steps": 4, "learning_rate": 3e-2}
    return {kind: train(make_recipe(tmp, kind.replace("_", "-"), adapter=adapter, training=short))
            for kind, adapter in KINDS.items()}


def chat(*args: str, script: str):
    """`finetune chat` in this process (the CLI's Typer app), the script on its stdin. The console entry point in a
    fresh process is tests/test_after_training.py's chat test; here that would import the ML stack six times."""
    return invoke_cli("chat", *args, "--max-new-tokens", "8", input=script)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_adapter_kind_answers_in_chat(runs, kind):
    result = chat(str(runs[kind]), script="What is the capital of France?\n/base\nWhat is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    tuned, base = result.stdout.splitlines()
    assert f"chatting with adapter {runs[kind].name}" in result.stderr
    assert tuned != base or kind == "adalora", result.stdout  # 4 steps of AdaLoRA barely move the tiny model


def test_adapters_of_one_kind_switch_on_one_base(runs):
    result = chat(str(runs["prompt_tuning"]), "--adapter", f"other={runs['prompt_tuning']}",
                  script="What is 3 plus 4?\n/reset\n/adapter other\nWhat is 3 plus 4?\n")
    assert result.returncode == 0, result.stderr
    first, other = result.stdout.splitlines()
    assert first == other  # the same adapter under two names answers the same


def test_adapters_of_different_kinds_are_refused_before_loading(runs):
    result = chat(str(runs["ia3"]), "--adapter", f"p={runs['prompt_tuning']}", script="hi\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "only when they are of one kind (ia3 is IA3, p is PROMPT_TUNING)" in result.stderr


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_eval_loss_of_prompt_learning_matches_peft(runs, kind):
    """Prompt tuning prepends virtual tokens (and their logits): the loss must be PEFT's own, per trained token."""
    import torch

    from finetune.inference.evaluate import loss_dataset, mean_loss
    from finetune.inference.load import load, resolve_source
    from finetune.recipe.schema import DataSection, DatasetSpec

    loaded = load(resolve_source(str(runs[kind])))
    spec = DatasetSpec(path="builtin:sample_eval_chat.jsonl", max_rows=4)
    dataset = loss_dataset(loaded, [spec], DataSection(train=[spec]), 256)
    batched, tokens = mean_loss(loaded, dataset, batch_size=4)
    total = 0.0
    for row in dataset:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        with torch.no_grad():
            total += loaded.model(input_ids=ids, labels=labels).loss.item() * int((labels[:, 1:] != -100).sum())
    assert batched == pytest.approx(total / tokens, rel=1e-4)


def test_eval_uses_the_rows_training_held_out(tmp_path, torch_one_thread):
    from finetune.inference.evaluate import run_eval

    run = train(make_recipe(tmp_path, "held", data={"train": [{"path": "builtin:sample_chat.jsonl", "max_rows": 40}],
                                                     "eval_fraction": 0.25}, training={"max_steps": 2}))
    from finetune.run.layout import RunDir
    from finetune.run.records import read_audit

    held = read_audit(RunDir(run)).datasets[0]["held_out"]
    messages = []
    results = run_eval(str(run), max_new_tokens=4, log=messages.append)
    assert held == 10 and f"evaluating on the {held} rows training held out" in "\n".join(messages)
    assert results["held"]["loss"] > 0 and "exact_match" in results["held"]


def test_added_special_tokens_reach_the_output():
    from transformers import AutoTokenizer

    from finetune.inference.load import Loaded, Source, decode_reply
    from finetune.model.builtin import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    loaded = Loaded(None, tokenizer, [], Source("x", "x"), "cpu")
    reply = tokenizer.encode('<tool_call>{"name": "f"}</tool_call>', add_special_tokens=False)
    ids = reply + [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id]
    assert decode_reply(loaded, ids) == '<tool_call>{"name": "f"}</tool_call>'
