"""QLoRA gradients on the tiny model, loaded as training loads it, against the same math in float32.

The reference replaces every bitsandbytes Linear4bit with a plain nn.Linear holding its dequantised weight,
so the LoRA gradients of both must agree. An evaluation pass (eval mode, no grad) sits between two training
steps in every run with data.eval: on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks its weights there for
an inference kernel without autograd (see finetune.model.load.keep_4bit_training_kernel). On a CPU without
AVX512-BF16 bitsandbytes never repacks, so these tests pass there with or without the guard.
"""

from __future__ import annotations

import copy
import warnings

import pytest

from tests.test_train import QLORA, make_recipe

pytestmark = pytest.mark.slow


def qlora_model(tmp_path):
    """builtin:tiny-llama in 4-bit through finetune's loader, with the recipe's LoRA adapter, B made nonzero."""
    import torch
    from peft import get_peft_model

    from finetune.adapters.configs import build_peft_config
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_model, resolve_precision
    from finetune.recipe import load_recipe

    recipe = load_recipe(make_recipe(tmp_path, "qlora-grads", **QLORA)).recipe
    path = resolve_model_path(recipe.model.path)
    base = load_model(path, recipe, resolve_precision(recipe))
    torch.manual_seed(0)  # PEFT draws A from the global generator
    model = get_peft_model(base, build_peft_config(recipe, model_path=path, hidden_size=None, total_steps=None))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero, which would leave every A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.train()


def token_ids(model, rows: int, tokens: int):
    import torch

    return torch.randint(0, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(1))


def lora_grads(model, ids) -> dict:
    """The gradients of the trainable parameters (None where none arrived) for a loss on every position.

    Cross-entropy of each position's logits against its own token, unshifted, so that a single token (the one
    vector bitsandbytes' gemv kernel is named for) has a loss too.
    """
    import torch

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def dequantised_copy(model):
    """A copy of the model with each Linear4bit replaced by an nn.Linear holding its dequantised fp32 weight."""
    import bitsandbytes as bnb
    import torch

    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=child.bias is not None)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.detach().float(), requires_grad=False)
                setattr(parent, name, linear)
    return ref


def eval_pass(model, ids) -> None:
    """What an evaluation does between training steps: eval mode, a forward without grad, back to train."""
    import torch

    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()


def max_abs_diff(grads: dict, reference: dict) -> float:
    """Largest elementwise difference over all parameters; inf where a gradient is missing on one side."""
    worst = 0.0
    for name, want in reference.items():
        got = grads[name]
        if (got is None) != (want is None):
            return float("inf")
        if got is not None:
            worst = max(worst, (got - want).abs().max().item())
    return worst


def bitsandbytes_default(model) -> None:
    """Undo finetune.model.load.keep_4bit_training_kernel: repack for inference where the CPU can."""
    from bitsandbytes.functional import has_avx512bf16

    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = has_avx512bf16()


def gemv_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "gemv_4bit" in str(w.message)]


@pytest.mark.parametrize("rows,tokens", [(2, 16), (1, 1)])  # (1, 1): one vector, what bitsandbytes calls gemv
def test_lora_grads_match_the_dequantised_model_before_and_after_an_eval_pass(tmp_path, torch_one_thread,
                                                                              rows, tokens):
    pytest.importorskip("bitsandbytes")
    model = qlora_model(tmp_path)
    ids = token_ids(model, rows, tokens)
    reference = lora_grads(dequantised_copy(model), ids)
    assert max(g.abs().max().item() for g in reference.values()) > 1e-3  # a comparison of real gradients
    assert max_abs_diff(lora_grads(model, ids), reference) < 1e-5
    eval_pass(model, token_ids(model, 2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = lora_grads(model, ids)
    assert max_abs_diff(after, reference) < 1e-5
    assert gemv_warnings(caught) == []  # torch's warning that it backprops through an op without autograd


def test_bitsandbytes_repacking_would_corrupt_the_grads(tmp_path, torch_one_thread):
    """The failure the guard prevents, still caught by the comparison above: bitsandbytes' own default."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
    model = qlora_model(tmp_path)
    bitsandbytes_default(model)
    ids = token_ids(model, 2, 16)
    reference = lora_grads(dequantised_copy(model), ids)
    eval_pass(model, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = lora_grads(model, ids)
    # Measured 2026-11-29 (bitsandbytes 0.50.2, scripts/qlora_grads.py): max abs diff 1.2, largest grad 1.2.
    # If this fails, bitsandbytes no longer drops these gradients and keep_4bit_training_kernel may go.
    assert gemv_warnings(caught) and max_abs_diff(after, reference) > 0.1
