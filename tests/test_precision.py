"""Mixed precision keeps float32 masters: bf16 computes, float32 weights and optimizer states are what train.

No GPU here, so two things are mocked, and only these: `torch.cuda.is_available` / `is_bf16_supported` return
True to resolve a recipe as it resolves on a bf16-capable GPU (no CUDA call is made), and the training step runs
on the CPU with transformers' bf16 autocast (`bf16=True, use_cpu=True`), which is the same autocast + float32
weights arrangement the Trainer uses on a GPU. The dtypes of the trained parameters, their gradients and the
AdamW states are read after a real optimizer step.
"""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.recipe import recipe_from_dict

pytestmark = pytest.mark.slow


def recipe(adapter: dict, **training):
    return recipe_from_dict({
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"path": "builtin:sample_chat.jsonl", "max_rows": 8}]},
        "method": {"kind": "sft"}, "adapter": adapter,
        "training": {"max_length": 64, "micro_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3, **training},
    })  # fmt: skip


@pytest.fixture
def bf16_gpu(monkeypatch):
    """Precision resolves as on a GPU with bf16 (mocked: no GPU here)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_bf16_loads_what_trains_in_float32_and_a_frozen_base_in_bf16(bf16_gpu):
    import torch

    from finetune.model.load import resolve_precision

    full = resolve_precision(recipe({"kind": "full"}))
    assert (full.device, full.bf16, full.load_dtype) == ("cuda", True, torch.float32)  # masters are the weights
    pure = resolve_precision(recipe({"kind": "full"}, fp32_master_weights=False))
    assert pure.load_dtype == torch.bfloat16  # the explicit opt-in
    lora = resolve_precision(recipe({"kind": "lora"}))
    assert lora.load_dtype == torch.bfloat16  # frozen: half the memory, never updated
    with pytest.raises(UserError) as info:
        recipe({"kind": "full"}, precision="fp16", fp32_master_weights=False)
    assert "fp32_master_weights" in info.value.render()


@pytest.mark.parametrize("adapter", [{"kind": "full"},
                                     {"kind": "lora", "r": 4, "modules_to_save": ["lm_head"]}], ids=["full", "lora"])
def test_after_a_bf16_step_trained_weights_grads_and_adam_states_are_float32(adapter, tmp_path, torch_one_thread):
    import torch

    from finetune.adapters import hooks
    from finetune.adapters.configs import build_peft_config
    from finetune.data.prepare import prepare_datasets, set_chat_template
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import Precision, load_dtype_name, load_model, load_tokenizer
    from finetune.train.trainers import build_sft_trainer

    run = recipe(adapter, precision="fp32")  # validated as fp32; the precision below is what a bf16 GPU resolves
    precision = Precision(device="cpu", load_dtype=getattr(torch, load_dtype_name(run, "bf16")), bf16=True, fp16=False)
    path = resolve_model_path(run.model.path)
    tokenizer = load_tokenizer(path, run.model)
    set_chat_template(run, tokenizer)
    rows = prepare_datasets(run, tokenizer, lambda _: None)[0].select_columns(["input_ids", "labels"])
    model = load_model(path, run, precision)
    peft_config = build_peft_config(run, model_path=path, hidden_size=None, total_steps=None)
    trainer = build_sft_trainer(run, model, tokenizer, rows, None, peft_config, precision, tmp_path)
    hooks.prepare_trainer(trainer, run, tmp_path, path, None)
    assert trainer.args.bf16
    grads = {}
    trainer.add_callback(_KeepGradDtypes(grads))
    trainer.train()
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values()), {n: p.dtype for n, p in trained.items()}
    assert grads and set(grads.values()) == {torch.float32}
    states = [s for state in trainer.optimizer.state.values() for s in state.values() if torch.is_tensor(s) and s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)
    if adapter["kind"] == "lora":  # the frozen base stayed in bf16; the modules_to_save copy was cast up
        frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def _KeepGradDtypes(grads: dict):  # noqa: N802 (a factory: transformers is imported only inside tests)
    from transformers import TrainerCallback

    class KeepGradDtypes(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.dtype for n, p in model.named_parameters() if p.grad is not None})

    return KeepGradDtypes()
