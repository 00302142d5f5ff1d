"""Every adapter kind x every SFT batching mode: the summed loss equals the padded one, or the recipe is refused.

Batching changes which rows share a sequence, never what a token's loss is: the sum over every trained token of
the same rows must be the same padded, length-grouped, padding-free (rows of a batch concatenated, told apart by
position_ids) and packed (TRL's bfd packing). Prompt and prefix tuning cannot keep concatenated rows apart: PEFT
drops position_ids when it adds the virtual tokens or the prefix cache, so rows attend to each other. Those
combinations are refused when the recipe is validated; `test_prompt_and_prefix_tuning_mix_concatenated_rows`
shows what they would train.

Each adapter is built once with a fixed seed and run on the trainer's own dataloader for each mode (the one
TRL builds from the recipe), in eval mode with the KV cache off, as TRL's loss runs it.
"""

from __future__ import annotations

import functools

import pytest

from finetune.errors import UserError
from finetune.recipe import recipe_from_dict

pytestmark = pytest.mark.slow

ROWS = 16
ADAPTERS = {
    "full": {"kind": "full"},
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": "gaussian"},
    "qlora": {"kind": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "init": "gaussian"},
    "adalora": {"kind": "adalora", "init_r": 4, "target_r": 2, "dropout": 0.0},
    "ia3": {"kind": "ia3"},
    "prompt_tuning": {"kind": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"kind": "prefix_tuning", "num_virtual_tokens": 4},
}
MODES = {
    "padded": ({"packing": False}, {"batching": "padded"}),
    "grouped": ({"packing": False}, {"batching": "grouped"}),
    "padding_free": ({"packing": False}, {"batching": "padding_free"}),
    "packed": ({"packing": True}, {}),
}
REFUSED = {(kind, mode) for kind in ("prompt_tuning", "prefix_tuning") for mode in ("padding_free", "packed")}


def recipe_dict(adapter: str, mode: str) -> dict:
    method, training = MODES[mode]
    return {
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"path": "builtin:sample_chat.jsonl", "max_rows": ROWS}]},
        "method": {"kind": "sft", **method},
        "adapter": ADAPTERS[adapter],
        "training": {"max_length": 128, "micro_batch_size": 4, "max_steps": 8, "seed": 3, **training},
    }


@functools.cache
def prepared(adapter: str):
    """(recipe, tokenizer, rows, the wrapped model, precision) for an adapter, built once with a fixed seed."""
    import torch

    from finetune.adapters.configs import build_peft_config
    from finetune.data.prepare import prepare_datasets, set_chat_template
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_model, load_tokenizer, resolve_precision

    recipe = recipe_from_dict(recipe_dict(adapter, "padded"))
    path = resolve_model_path(recipe.model.path)
    tokenizer = load_tokenizer(path, recipe.model)
    set_chat_template(recipe, tokenizer)
    rows = prepare_datasets(recipe, tokenizer, lambda _: None)[0].select_columns(["input_ids", "labels"])
    precision = resolve_precision(recipe)
    torch.manual_seed(0)
    model = load_model(path, recipe, precision)
    peft_config = build_peft_config(recipe, model_path=path, hidden_size=model.config.hidden_size, total_steps=8)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return recipe, tokenizer, rows, model.eval(), precision


def loss_sum(adapter: str, recipe, tmp_path) -> tuple[float, int]:
    """Summed cross-entropy of every trained token, and how many there are, over the trainer's batches."""
    import torch

    from finetune.train.trainers import build_sft_trainer

    _, tokenizer, rows, model, precision = prepared(adapter)
    trainer = build_sft_trainer(recipe, model, tokenizer, rows, None, None, precision, tmp_path)
    total, tokens = 0.0, 0
    for batch in trainer.get_train_dataloader():
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits[:, -labels.size(1) :]  # after any virtual tokens
        logits, labels = logits[:, :-1], labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    return total, tokens


@pytest.mark.parametrize("mode", [m for m in MODES if m != "padded"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_every_batching_mode_is_exact_or_refused(adapter, mode, tmp_path, torch_one_thread):
    if (adapter, mode) in REFUSED:
        with pytest.raises(UserError) as info:
            recipe_from_dict(recipe_dict(adapter, mode))
        assert f"adapter.kind: {adapter} cannot keep apart" in info.value.render()
        return
    padded = loss_sum(adapter, recipe_from_dict(recipe_dict(adapter, "padded")), tmp_path)
    other = loss_sum(adapter, recipe_from_dict(recipe_dict(adapter, mode)), tmp_path)
    assert other[1] == padded[1] > 0  # the same trained tokens
    assert abs(other[0] - padded[0]) < 1e-4 * padded[0], (other, padded)


@pytest.mark.parametrize("adapter", ["prompt_tuning", "prefix_tuning"])
def test_prompt_and_prefix_tuning_mix_concatenated_rows(adapter, tmp_path, torch_one_thread):
    # What the refused combinations would train, with the refusal bypassed (model_copy does not validate):
    # rows of a packed sequence attend to each other, so the summed loss is not the padded one.
    from finetune.recipe.schema import SFTMethod

    recipe = recipe_from_dict(recipe_dict(adapter, "padded"))
    packed = recipe.model_copy(update={"method": SFTMethod(kind="sft", packing=True)})
    padded, mixed = loss_sum(adapter, recipe, tmp_path), loss_sum(adapter, packed, tmp_path)
    assert mixed[1] == padded[1]
    assert abs(mixed[0] - padded[0]) > 0.01 * padded[0], (mixed, padded)
