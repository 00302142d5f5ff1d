"""The data pipeline under real training: shipped format recipes train, packing is exact, the cache is reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.recipe import load_recipe
from tests.conftest import REPO

pytestmark = pytest.mark.slow

QUICK = ["training.max_steps=2", "training.logging_steps=1", "training.eval_steps=null"]


def train(recipe: str, out: Path, *overrides: str) -> tuple[Path, list[str]]:
    from finetune.train.run import run_training

    lines: list[str] = []
    loaded = load_recipe(REPO / "recipes/tiny" / recipe, [*QUICK, f"output.dir={out}", *overrides])
    return run_training(loaded, log=lines.append), lines


@pytest.mark.parametrize("recipe", ["sft_alpaca.yaml", "pretrain_text.yaml", "sft_mix.yaml", "sft_tool_calls.yaml"])
def test_shipped_format_recipes_train(recipe, tmp_path, torch_one_thread):
    run_dir, _ = train(recipe, tmp_path / "run")
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    audit = json.loads((run_dir / "audit.json").read_text())["datasets"]
    assert all(a["kept"] > 0 and a["trained_tokens"] > 0 for a in audit)


def test_second_train_on_unchanged_data_tokenises_nothing(tmp_path, monkeypatch, torch_one_thread):
    import transformers

    import finetune.data.masks as masks

    calls: list[str] = []

    def spy(owner, name):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(name) or original(*a, **k))

    spy(masks, "_encode")  # our encoder (one call per row)
    spy(transformers.PreTrainedTokenizerBase, "__call__")  # anything else, TRL included
    spy(transformers.PreTrainedTokenizerBase, "apply_chat_template")
    first, lines = train("sft_sharegpt.yaml", tmp_path / "first")
    assert calls.count("_encode") == 120 and any("cache entry" in line for line in lines)
    calls.clear()
    second, lines = train("sft_sharegpt.yaml", tmp_path / "second")
    assert calls == [], calls
    assert "data: cache hit, nothing to tokenise" in "\n".join(lines)
    assert (first / "audit.json").read_text() == (second / "audit.json").read_text()


def test_packed_and_unpacked_losses_agree_on_the_same_rows(tmp_path, torch_one_thread):
    """TRL's bfd packing (padding-free) gives the same per-token loss sum as padded batches.

    The sum over every trained token is compared, not a mean per batch: packing changes how rows
    are grouped into batches, which changes batch means but must not change any token's loss.
    """
    torch = torch_one_thread
    from finetune.adapters.configs import build_peft_config
    from finetune.data.prepare import prepare_datasets, set_chat_template
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_model, load_tokenizer, resolve_precision
    from finetune.train.trainers import build_sft_trainer

    def loss_sum(packing: bool):
        overrides = ["data.train.0.max_rows=24", f"method.packing={packing}", "training.max_length=128"]
        overrides += [] if packing else ["training.batching=padded"]  # auto would pick padding-free batches
        recipe = load_recipe(REPO / "recipes/tiny/sft_lora.yaml", overrides).recipe
        path = resolve_model_path(recipe.model.path)
        tokenizer = load_tokenizer(path, recipe.model)
        set_chat_template(recipe, tokenizer)
        rows = prepare_datasets(recipe, tokenizer, lambda _: None)[0].select_columns(["input_ids", "labels"])
        precision = resolve_precision(recipe)
        model = load_model(path, recipe, precision)
        peft_config = build_peft_config(recipe, model_path=path, hidden_size=None, total_steps=None)
        trainer = build_sft_trainer(recipe, model, tokenizer, rows, None, peft_config, precision, tmp_path)
        total, tokens, sequences = 0.0, 0, 0
        model = trainer.model.eval()
        for batch in trainer.get_train_dataloader():
            labels = batch.pop("labels")[:, 1:]
            with torch.no_grad():
                logits = model(**batch, use_cache=False).logits[:, :-1]  # the cache makes packed rows attend
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            tokens += int((labels != -100).sum())
            sequences += len(batch["cu_seq_lens_q"]) - 1 if "cu_seq_lens_q" in batch else len(labels)
            assert ("position_ids" in batch and "attention_mask" not in batch) == packing
        return total, tokens, sequences

    padded, packed = loss_sum(False), loss_sum(True)
    assert packed[1:] == padded[1:] == (packed[1], 24)  # the same 24 rows, the same trained tokens
    assert abs(packed[0] - padded[0]) < 1e-4 * padded[0], (packed, padded)
