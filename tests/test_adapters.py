"""Adapter sections without training: schema rules, module selection on the meta skeleton, step counts."""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.recipe import recipe_from_dict
from finetune.recipe.schema import TrainingSection

BASE = {
    "model": {"path": "builtin:tiny-llama"},
    "data": {"train": [{"path": "builtin:sample_chat.jsonl"}]},
    "method": {"kind": "sft"},
}


def recipe(adapter: dict, **sections):
    return recipe_from_dict({**BASE, **sections, "adapter": adapter})


def problems(adapter: dict, **sections) -> list[str]:
    with pytest.raises(UserError) as info:
        recipe(adapter, **sections)
    return info.value.problems


@pytest.mark.parametrize(
    "adapter",
    [
        {"kind": "lora", "init": "pissa", "loraplus_lr_ratio": 16, "layers": {"first": 0, "last": 1},
         "target_modules": ["q_proj", "v_proj"]},
        {"kind": "lora", "init": "olora", "use_rslora": True, "target_modules": {"regex": r".*\.(q|v)_proj"}},
        {"kind": "qlora", "init": "loftq"},
        {"kind": "adalora", "init_r": 8, "target_r": 4, "layers": [0, 3], "target_modules": ["q_proj"]},
        {"kind": "ia3"},
        {"kind": "prompt_tuning", "init": "text", "init_text": "Answer briefly."},
        {"kind": "prefix_tuning", "prefix_projection": True, "projection_hidden_size": 64},
        {"kind": "full", "trainable_modules": ["embed_tokens", "lm_head"]},
        {"kind": "full"},
    ],
    ids=lambda a: a["kind"],
)
def test_every_kind_validates_and_round_trips(adapter):
    from finetune.recipe.dump import dump_recipe
    from finetune.recipe.load import yaml

    parsed = recipe(adapter)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(parsed)))
    assert again.adapter == parsed.adapter


def test_switching_kind_with_set_replaces_the_section():
    from finetune.recipe import load_recipe
    from tests.conftest import REPO

    for kind in ("full", "lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning"):
        loaded = load_recipe(REPO / "recipes/tiny/sft_lora.yaml", [f"adapter={{kind: {kind}}}"])
        assert loaded.recipe.adapter.kind == kind


@pytest.mark.parametrize(
    ("adapter", "sections", "expected"),
    [
        ({"kind": "lora", "init": "pissa", "use_dora": True}, {}, "adapter.init: 'pissa' cannot be combined with"),
        ({"kind": "qlora", "init": "olora"}, {}, "adapter.init: 'olora' rewrites the base weights"),
        ({"kind": "lora", "init": "loftq"}, {}, "adapter.init: 'loftq' initialises the adapter from the 4-bit"),
        ({"kind": "lora", "layers": [0]}, {}, "adapter.layers: cannot narrow 'all-linear'"),
        ({"kind": "lora", "target_modules": {"regex": "q"}, "layers": [0]}, {},
         "adapter.layers: cannot narrow a regex"),
        ({"kind": "lora", "layers": {"first": 2, "last": 1}, "target_modules": ["q_proj"]}, {},
         "adapter.layers.last: is 1, before first (2)"),
        ({"kind": "lora", "target_modules": "q_proj"}, {}, "write [q_proj] for one module name"),
        ({"kind": "lora", "target_modules": {"regex": "(("}}, {}, "adapter.target_modules.regex: does not compile"),
        ({"kind": "lora", "loraplus_lr_ratio": 0.5}, {}, "adapter.loraplus_lr_ratio: expected greater than or equal"),
        ({"kind": "adalora", "target_r": 20}, {}, "adapter.target_r: is 20, above init_r (12)"),
        ({"kind": "adalora", "rank_warmup_ratio": 0.5, "rank_final_ratio": 0.5}, {},
         "adapter.rank_final_ratio: rank_warmup_ratio + rank_final_ratio is 1"),
        ({"kind": "ia3", "target_modules": ["k_proj"]}, {}, "adapter.feedforward_modules: ['down_proj'] are not in"),
        ({"kind": "prompt_tuning", "init": "text"}, {}, "adapter.init_text: is required with init: text"),
        ({"kind": "prompt_tuning", "num_virtual_tokens": 0}, {}, "adapter.num_virtual_tokens: expected greater than 0"),
        ({"kind": "prefix_tuning", "projection_hidden_size": 8}, {}, "adapter.projection_hidden_size: is only used"),
        ({"kind": "prefix_tuning"}, {"training": {"gradient_checkpointing": True}},
         "training.gradient_checkpointing: cannot be used with adapter.kind: prefix_tuning"),
        ({"kind": "prompt_tuning"}, {"model": {"path": "x", "add_special_tokens": ["<t>"]}},
         "model.add_special_tokens: adds tokens whose embeddings must be trained"),
        ({"kind": "full", "trainable_modules": "lm_head"}, {}, "adapter.trainable_modules: expected a list"),
        ({"kind": "ia3", "r": 8}, {}, "adapter.r: unknown key; it is a setting of kind lora / qlora"),
    ],
)
def test_adapter_rules_name_the_key(adapter, sections, expected):
    found = problems(adapter, **sections)
    assert any(expected in p for p in found), "\n".join(found)


def test_total_optimizer_steps_counts_like_the_trainer():
    from finetune.adapters.configs import total_optimizer_steps

    def steps(**training):
        return total_optimizer_steps(50, TrainingSection(**training))

    assert steps(micro_batch_size=8) == 7  # 7 batches, the last one partial
    assert steps(micro_batch_size=8, gradient_accumulation_steps=2) == 4  # 7 batches -> 3 full steps + 1
    assert steps(micro_batch_size=8, gradient_accumulation_steps=2, epochs=2.5) == 10
    assert steps(micro_batch_size=8, max_steps=3) == 3
    assert total_optimizer_steps(50, TrainingSection(micro_batch_size=8), world_size=2) == 4


def test_adalora_schedule_is_a_fraction_of_the_real_steps_and_refuses_too_short_runs():
    from finetune.adapters.configs import adalora_schedule

    adapter = recipe({"kind": "adalora", "rank_warmup_ratio": 0.1, "rank_final_ratio": 0.2}).adapter
    assert adalora_schedule(adapter, 1000) == (100, 200)
    assert adalora_schedule(adapter, 4) == (0, 1)  # the final phase is never empty
    with pytest.raises(UserError, match="only 1 optimizer steps"):
        adalora_schedule(adapter, 1)


def test_module_types_group_parameters_by_what_holds_them():
    from finetune.adapters.summary import module_type

    assert module_type("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == (
        "q_proj", "lora_A"
    )
    assert module_type("base_model.model.model.embed_tokens.modules_to_save.default.weight") == (
        "embed_tokens", "modules_to_save"
    )
    assert module_type("prompt_encoder.default.embedding.weight") == ("prompt_encoder", "embedding")
    assert module_type("prompt_encoder.default.transform.0.weight") == ("prompt_encoder", "transform")
    assert module_type("model.layers.0.input_layernorm.weight") == ("input_layernorm", "")
    assert module_type("lm_head.weight") == ("lm_head", "")


@pytest.fixture(scope="module")
def layout():
    from finetune.adapters.targets import read_layout
    from finetune.model.builtin import resolve_model_path

    return read_layout(resolve_model_path("builtin:tiny-llama"), recipe({"kind": "lora"}))


def selection_problems(layout, adapter: dict, **sections) -> list[str]:
    from finetune.adapters.targets import check_selection

    with pytest.raises(UserError) as info:
        check_selection(recipe(adapter, **sections), layout, "builtin:tiny-llama")
    assert "do not fit this model" in str(info.value)
    return info.value.problems


@pytest.mark.slow
def test_skeleton_is_read_without_weights(layout):
    assert layout.num_layers == 4 and layout.hidden_size == 128
    assert (layout.input_embeddings, layout.output_embeddings) == ("model.embed_tokens", "lm_head")
    assert "model.layers.3.mlp.down_proj" in layout.adaptable["ia3"]


@pytest.mark.slow
def test_unmatched_targets_are_named_with_the_available_names(layout):
    (problem,) = selection_problems(layout, {"kind": "lora", "target_modules": ["q_proj", "q_prj", "vproj"]})
    assert problem.startswith("adapter.target_modules: 'q_prj', 'vproj' match no module")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in problem


@pytest.mark.slow
def test_every_kind_of_bad_selection_is_reported_at_once(layout):
    adapter = {"kind": "lora", "target_modules": ["self_attn", "lm_head"], "layers": [0, 9]}
    found = selection_problems(layout, {**adapter, "modules_to_save": ["embed_tokns"]})
    text = "\n".join(found)
    assert "adapter.layers: [9] out of range; the model has 4 layers (0-3)" in text
    assert "'lm_head' matches only modules outside adapter.layers" in text
    assert "'self_attn' (LlamaAttention) matches modules that adapter.kind lora cannot wrap" in text
    assert "adapter.modules_to_save: 'embed_tokns' matches no module" in text
    regex = selection_problems(layout, {"kind": "adalora", "target_modules": {"regex": r"model\.layer\..*"}})
    assert regex[0].startswith(r"adapter.target_modules: regex 'model\\.layer\\..*' matches no module")
    full = selection_problems(layout, {"kind": "full", "trainable_modules": ["layers.7"]})
    assert full[0].startswith("adapter.trainable_modules: 'layers.7' matches no module")


@pytest.mark.slow
def test_new_tokens_need_trained_embedding_rows(layout):
    from finetune.adapters.targets import check_selection

    tokens = {"model": {"path": "builtin:tiny-llama", "add_special_tokens": ["<|tool|>"]}}
    (problem,) = selection_problems(layout, {"kind": "lora", "modules_to_save": ["embed_tokens"]}, **tokens)
    assert "rows in 'lm_head' would never be trained; add them to adapter.modules_to_save" in problem
    (problem,) = selection_problems(layout, {"kind": "full", "trainable_modules": ["layers.3"]}, **tokens)
    assert "'embed_tokens', 'lm_head' would never be trained; add them to adapter.trainable_modules" in problem
    check_selection(recipe({"kind": "lora", "modules_to_save": ["embed_tokens", "lm_head"]}, **tokens), layout, "x")
    check_selection(recipe({"kind": "full"}, **tokens), layout, "x")


@pytest.mark.slow
@pytest.mark.parametrize(
    "adapter",
    [
        {"kind": "lora", "target_modules": ["q_proj", "down_proj"], "layers": {"first": 1, "last": 2}},
        {"kind": "lora", "target_modules": {"regex": r"model\.layers\.[02]\.self_attn\.[kv]_proj"}},
        {"kind": "lora", "target_modules": ["layers.3.mlp.up_proj", "v_proj"], "modules_to_save": ["v_proj"]},
        {"kind": "adalora", "target_modules": ["o_proj"], "layers": [3]},
        {"kind": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    ],
    ids=["names+layers", "regex", "saved-excluded", "adalora", "ia3"],
)
def test_predicted_targets_are_what_peft_wraps(adapter, torch_one_thread):
    """Our matcher mirrors PEFT's; compare it with the modules PEFT really wraps."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from finetune.adapters.configs import build_peft_config
    from finetune.adapters.targets import excluded_as_saved, select
    from finetune.model.builtin import resolve_model_path

    path = resolve_model_path("builtin:tiny-llama")
    parsed = recipe(adapter)
    model = AutoModelForCausalLM.from_pretrained(path)
    names = [n for n, _ in model.named_modules()]
    layers = getattr(parsed.adapter, "layer_indices", None)
    predicted = {
        n for n in select(names, parsed.adapter.target_modules, layers)
        if not excluded_as_saved(parsed.adapter.modules_to_save, n)
    }
    config = build_peft_config(parsed, model_path=path, hidden_size=128, total_steps=10)
    wrapped = get_peft_model(model, config)
    actual = {
        n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, BaseTunerLayer)
    }
    assert predicted and predicted == actual


@pytest.mark.slow
def test_adalora_penalty_is_the_one_peft_adds_to_a_model_loss(torch_one_thread):
    """TRL computes its losses outside the model, where PEFT's AdaLoRA penalty is lost; ours must equal it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.adapters.configs import build_peft_config
    from finetune.adapters.hooks import orthogonality_penalty
    from finetune.model.builtin import resolve_model_path

    path = resolve_model_path("builtin:tiny-llama")
    ids = torch.arange(3, 40).reshape(1, -1)
    losses = {}
    for weight in (0.0, 0.7):
        parsed = recipe({"kind": "adalora", "dropout": 0.0, "orth_reg_weight": weight})
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(path),
            build_peft_config(parsed, model_path=path, hidden_size=128, total_steps=10),
        )
        with torch.no_grad():
            losses[weight] = model(input_ids=ids, labels=ids).loss.item()
            penalty = orthogonality_penalty(model).item()
    assert penalty > 0.1
    assert losses[0.7] - losses[0.0] == pytest.approx(0.7 * penalty, rel=1e-5)
