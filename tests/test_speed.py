"""finetune's speed choices change how fast a batch trains, never its loss: each is compared with TRL's own path."""

from __future__ import annotations

import json

import pytest

from finetune.errors import UserError
from finetune.recipe.load import recipe_from_dict

BASE = {
    "model": {"path": "builtin:tiny-llama"},
    "data": {"train": [{"path": "builtin:sample_chat.jsonl", "max_rows": 48}]},
    "method": {"kind": "sft"},
    "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "training": {"micro_batch_size": 8, "max_length": 128, "max_steps": 4, "logging_steps": 1},
}


def recipe(**sections):
    data = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return recipe_from_dict(data)


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"method": {"packing": True}, "training": {"batching": "grouped"}}, "training.batching"),
        ({"training": {"token_metrics": True, "lm_head": "full_logits"}}, "training.token_metrics"),
        ({"method": {"kind": "dpo"}, "training": {"lm_head": "chunked"}}, "training.lm_head"),
    ],
)
def test_speed_options_that_cannot_apply_are_refused(sections, key):
    with pytest.raises(UserError) as info:
        recipe(**sections)
    assert any(key in p for p in info.value.problems), info.value.problems


def test_auto_choices_follow_the_device_and_attention():
    from finetune.train.sft_options import resolve_batching, resolve_lm_head, sft_config_kwargs

    default = recipe()
    assert resolve_batching(default) == "padded" and resolve_lm_head(default, "cpu") == "full_logits"
    assert resolve_lm_head(default, "cuda") == "chunked"
    assert resolve_batching(recipe(model={"attn_implementation": "flash_attention_2"})) == "padding_free"
    assert resolve_lm_head(recipe(training={"token_metrics": True}), "cpu") == "chunked"
    assert sft_config_kwargs(recipe(training={"batching": "padding_free"}))["max_length"] is None
    assert sft_config_kwargs(recipe(method={"packing": True}))["packing"] is True


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, torch_one_thread):
    """finetune's SFT trainer on the tiny model, with TRL's chunked head and all its token metrics."""
    from transformers import AutoTokenizer

    from finetune.adapters.configs import build_peft_config
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_model, resolve_precision
    from finetune.train.run import _build_data
    from finetune.train.trainers import build_sft_trainer

    torch = torch_one_thread
    r = recipe(training={"lm_head": "chunked", "token_metrics": True, "batching": "grouped"})
    precision = resolve_precision(r)
    path = resolve_model_path(r.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    run_dir = tmp_path_factory.mktemp("speed")
    from finetune.run.layout import RunDir

    train_ds, _ = _build_data(r, tokenizer, RunDir(run_dir), lambda _: None)
    torch.manual_seed(0)
    peft_config = build_peft_config(r, model_path=path, hidden_size=None, total_steps=None)
    model = load_model(path, r, precision)
    trainer = build_sft_trainer(r, model, tokenizer, train_ds, None, peft_config, precision, run_dir)
    with torch.no_grad():  # LoRA B starts at zero; give both matrices values so every gradient is non-trivial
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    trainer.model.train()
    return trainer


def loss_and_grads(trainer, inputs, num_items_in_batch=None):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def scaled_count(inputs) -> int:
    """A num_items_in_batch as gradient accumulation over three such batches gives it."""
    return 3 * int((inputs["labels"][:, 1:] != -100).sum())


def assert_same(a, b, tol=1e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    worst = max((grads_a[k] - grads_b[k]).abs().max().item() / (grads_b[k].abs().max().item() + 1e-12)
                for k in grads_a)
    assert worst < tol, worst


@pytest.mark.slow
def test_lean_loss_heads_give_trl_loss_and_gradients(trainer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    rows = [trainer.train_dataset[i] for i in range(8)]
    padded = trainer._prepare_inputs(trainer.data_collator(rows))
    assert (padded["attention_mask"] == 0).any()  # the batch does carry padding
    trl_path = loss_and_grads(trainer, padded)  # token_metrics on: TRL's own compute_loss
    scaled = loss_and_grads(trainer, padded, num_items_in_batch=scaled_count(padded))

    trainer.token_metrics = False
    trainer.lm_head = "full_logits"
    assert_same(loss_and_grads(trainer, padded), trl_path)
    assert_same(loss_and_grads(trainer, padded, num_items_in_batch=scaled_count(padded)), scaled)

    # The chunked head patched to log-probabilities only, as FastSFTTrainer does when token_metrics is off.
    add_fused_lm_head(trainer.model.get_base_model(), outputs=("log_probs",))
    trainer.lm_head = "chunked"
    assert_same(loss_and_grads(trainer, padded), trl_path)

    # padding_free: the same rows concatenated without padding give the same loss and gradients.
    collator = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id, padding_free=True)
    flat = trainer._prepare_inputs(collator(rows))
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    assert_same(loss_and_grads(trainer, flat), trl_path)
    trainer.lm_head = "full_logits"
    assert_same(loss_and_grads(trainer, flat), trl_path)


@pytest.mark.slow
def test_grouped_batches_cover_every_row_once_with_less_padding(trainer):
    import random

    import datasets

    rng = random.Random(0)
    lengths = [int(min(max(rng.lognormvariate(0, 0.75) * 150, 8), 512)) for _ in range(400)]
    rows = [[1] * n for n in lengths]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    order = list(iter(trainer._get_train_sampler(dataset)))
    assert sorted(order) == list(range(len(lengths)))

    def padding(indices):
        batches = [indices[i:i + 8] for i in range(0, len(indices), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    assert padding(order) < 0.25 * padding(shuffled)


@pytest.mark.slow
def test_training_logs_token_counts_and_peak_memory(tmp_path, torch_one_thread):
    import yaml

    from finetune.recipe import load_recipe
    from finetune.train.run import run_training

    data = json.loads(json.dumps(BASE))
    data["training"] |= {"batching": "padding_free", "lm_head": "chunked", "learning_rate": 1e-2}
    data["output"] = {"dir": str(tmp_path / "run")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    run_dir = run_training(load_recipe(path), log=lambda _: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    assert all(0 < r["num_trained_tokens"] < r["num_tokens"] == r["num_input_tokens"] for r in steps)  # no padding
    assert "mean_token_accuracy" not in steps[-1]  # token metrics off by default
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peak_rss_bytes"] > 100 * 2**20
