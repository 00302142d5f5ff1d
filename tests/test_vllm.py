"""Every shipped adapter recipe against vLLM's documented LoRA rules: a `vllm serve` command or a refusal.

vLLM itself needs a GPU, so the rules are vLLM's as documented in its source (vllm/lora/peft_helper.py
validate_legal, LoRAConfig.max_lora_rank), kept as data in finetune/export/vllm.py. Each recipe's
adapter_config.json is written by PEFT from the recipe (as training writes it), without training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from tests.conftest import REPO, run_cli

# recipe -> the --max-lora-rank the command needs (None: vLLM's default 16 suffices), or the refusal's words
EXPECTED = {
    "7b/qlora": None, "smollm2/dates_lora": None, "tiny/sft_tool_calls": None,  # r 16
    # r 32, the schema's default or set in the recipe
    "tiny/dpo_lora": 32, "tiny/dpo_qlora": 32, "tiny/kto_lora": 32, "tiny/orpo_lora": 32, "tiny/pretrain_text": 32,
    "tiny/sft_alpaca": 32, "tiny/sft_lora": 32, "tiny/sft_lora_zero3": 32, "tiny/sft_loraplus": 32, "tiny/sft_mix": 32,
    "tiny/sft_prompt_completion": 32, "tiny/sft_qlora": 32, "tiny/sft_sharegpt": 32,
    "tiny/sft_olora": 32, "tiny/sft_pissa": 32,  # saved converted to plain LoRA of rank 2r (PEFT), r 16
    "tiny/dpo_ia3": "LoRA adapters only; this one is IA3", "tiny/sft_ia3": "LoRA adapters only; this one is IA3",
    "tiny/sft_adalora": "LoRA adapters only; this one is ADALORA",
    "tiny/sft_prefix_tuning": "LoRA adapters only; this one is PREFIX_TUNING",
    "tiny/sft_prompt_tuning": "LoRA adapters only; this one is PROMPT_TUNING",
    "tiny/sft_dora": "does not support DoRA", "tiny/sft_new_tokens": "only loads adapters without modules_to_save",
    "tiny/sft_qlora_loftq": "LoftQ adapter carries the 4-bit quantisation error",
}


def shipped_adapter_recipes() -> list[str]:
    names = []
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        adapter = yaml.safe_load(path.read_text()).get("adapter") or {}
        if adapter.get("kind") != "full":
            names.append(str(path.relative_to(REPO / "recipes").with_suffix("")))
    return names


def test_every_shipped_adapter_recipe_has_an_expected_outcome():
    assert sorted(EXPECTED) == shipped_adapter_recipes()


def fake_run(recipe_path: Path, root: Path) -> Path:
    """A run directory as training leaves it, minus the weights: the recipe and PEFT's adapter_config.json."""
    from finetune.adapters.configs import build_peft_config
    from finetune.recipe import load_recipe
    from finetune.recipe.dump import dump_recipe
    from finetune.run.layout import RunDir

    recipe = load_recipe(recipe_path).recipe
    if recipe.model.path == "builtin:smollm2-135m":  # its weights are a 93 MB download; the rules read the adapter
        recipe = load_recipe(recipe_path, ["model.path=builtin:tiny-llama"]).recipe
    run = RunDir.at(root / "runs" / recipe.name)
    run.root.mkdir(parents=True, exist_ok=True)
    run.recipe.write_text(dump_recipe(recipe))
    config = build_peft_config(recipe, model_path="builtin:tiny-llama", hidden_size=128, total_steps=100)
    if recipe.adapter.kind in ("lora", "qlora") and recipe.adapter.init in ("pissa", "olora"):
        config.r *= 2  # what PEFT's conversion to plain LoRA on the original base saves
    config.save_pretrained(run.adapter)
    return run.root


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_shipped_recipe_against_vllm_rules(recipe, tmp_path, monkeypatch):
    from finetune.export.vllm import vllm_command

    monkeypatch.chdir(tmp_path)  # chained recipes name runs/<earlier run>, relative to where finetune runs
    (tmp_path / "configs").symlink_to(REPO / "configs")  # 7b/qlora's base: configs/models/llama-7b (config only)
    for earlier in ("sft_lora", "sft_qlora"):
        fake_run(REPO / "recipes/tiny" / f"{earlier}.yaml", tmp_path)
    run = fake_run(REPO / "recipes" / f"{recipe}.yaml", tmp_path)
    expected = EXPECTED[recipe]
    if isinstance(expected, str):
        with pytest.raises(UserError, match=expected):
            vllm_command(run)
        return
    command = vllm_command(run, name="mine")
    assert command.startswith("vllm serve ") and f"--lora-modules mine={(run / 'adapter').resolve()}" in command
    assert ("--max-lora-rank" in command) == (expected is not None)
    if expected:
        assert f"--max-lora-rank {expected}" in command
    assert "runs/" not in command.split()[2], command  # a chained run serves the true base, not the earlier run


def test_refusal_exits_non_zero_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fake_run(REPO / "recipes/tiny/sft_new_tokens.yaml", tmp_path)
    result = run_cli("export", str(run), "--format", "vllm", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not result.stdout
    assert f"finetune merge {run}`" in result.stderr and f"vllm serve {run / 'merged'}`" in result.stderr
    assert "train without adapter.modules_to_save" in result.stderr


def test_trained_template_is_passed_when_it_is_not_the_bases(tmp_path, monkeypatch):
    from finetune.export.vllm import vllm_command

    monkeypatch.chdir(tmp_path)
    run = fake_run(REPO / "recipes/tiny/sft_lora.yaml", tmp_path)
    from finetune.model.builtin import resolve_model_path

    base_template = (Path(resolve_model_path("builtin:tiny-llama")) / "chat_template.jinja").read_text()
    (run / "adapter/chat_template.jinja").write_text(base_template)
    assert "--chat-template" not in vllm_command(run)  # the base's own template: vLLM uses it anyway
    (run / "adapter/chat_template.jinja").write_text(base_template.replace("<|im_start|>", "<|im_start|> "))
    assert f"--chat-template {(run / 'adapter/chat_template.jinja').resolve()}" in vllm_command(run)
