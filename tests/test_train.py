"""Real training on the tiny model: LoRA, QLoRA and full SFT, DPO, merge, and the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe import load_recipe
from tests.conftest import invoke_cli, run_cli

pytestmark = pytest.mark.slow


def make_recipe(tmp_path: Path, name: str, **sections) -> Path:
    recipe = {
        "name": name,
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"path": "builtin:sample_chat.jsonl", "max_rows": 64}]},
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 1e-2, "max_steps": 12, "micro_batch_size": 8, "max_length": 128,
                     "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler": "constant"},
        "output": {"dir": str(tmp_path / "runs" / name)},
    }
    for key, value in sections.items():
        same_kind = isinstance(value, dict) and recipe.get(key, {}).get("kind", value.get("kind")) == value.get("kind")
        recipe[key] = {**recipe[key], **value} if same_kind and key in recipe else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# The learning tests' recipes over make_recipe's defaults (LoRA), also trained over several seeds by
# scripts/seed_margins.py to measure the margin assert_loss_falls keeps.
QLORA = {"adapter": {"kind": "qlora", "r": 8, "alpha": 16, "dropout": 0.0}}
FULL = {"adapter": {"kind": "full"}, "training": {"learning_rate": 2e-3}}


def train(path: Path, **kwargs) -> Path:
    from finetune.train.run import run_training

    return run_training(load_recipe(path), log=lambda _: None, **kwargs)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def assert_loss_falls(run_dir: Path) -> None:
    values = losses(run_dir)
    assert len(values) >= 6
    # Measured 2026-11-29 with `scripts/seed_margins.py --seeds 0-7,42` (docs/testing.md): last/first
    # loss 0.53-0.60 (LoRA), 0.52-0.61 (QLoRA), 0.37-0.45 (full) over seeds 0-7 and 42; bound 0.8.
    assert sum(values[-3:]) / 3 < 0.8 * sum(values[:3]) / 3, values


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, torch_one_thread):
    tmp = tmp_path_factory.mktemp("lora")
    return train(make_recipe(tmp, "lora"))


def test_sft_lora_trains_and_writes_the_run_directory(lora_run):
    assert_loss_falls(lora_run)
    for name in ("recipe.yaml", "audit.json", "metrics.jsonl", "summary.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/chat_template.jinja"):
        assert (lora_run / name).is_file(), name
    audit = json.loads((lora_run / "audit.json").read_text())["datasets"]
    assert audit[0]["rows"] == 64 and 0 < audit[0]["trained_fraction"] < 1
    assert load_recipe(lora_run / "recipe.yaml").recipe.adapter.r == 8  # the resolved recipe reloads


def test_merge_matches_adapter_and_keeps_base_dtype(lora_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.merge.bake import run_merge
    from finetune.model.builtin import resolve_model_path

    out = run_merge(lora_run, out=tmp_path / "merged", log=lambda _: None)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["saved_dtype"] == report["base_dtype"] == "float32"
    assert report["max_abs_logit_diff"] < 1e-4 and report["greedy_generations_agree"]
    provenance = json.loads((out / "provenance.json").read_text())  # the run's provenance travels with the merge
    assert provenance["merge"] == report and provenance["recipe"]["name"] == "lora"
    card = (out / "README.md").read_text()
    assert "## Merge check" in card and "`provenance.json`" in card
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    adapted = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the template travels with the merged model
    assert tokenizer.padding_side == AutoTokenizer.from_pretrained(lora_run / "adapter").padding_side
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (merged(ids).logits - adapted(ids).logits).abs().max().item()
    assert diff < 1e-4
    again = run_cli("merge", str(lora_run), "--out", str(out))
    assert again.returncode == 2 and "already holds a merge; pass --overwrite" in again.stderr


def test_existing_run_dir_is_not_overwritten(lora_run):
    before = (lora_run / "recipe.yaml").read_text()
    path = make_recipe(lora_run.parent.parent, "lora")
    with pytest.raises(UserError, match="already holds a run; pass --overwrite"):
        train(path)
    assert (lora_run / "recipe.yaml").read_text() == before


def encode_builtin(name: str, tokenizer, **spec):
    """Encode a shipped sample file as the pipeline does; also return its rows by "file:line" tag."""
    from finetune.data.pipeline import encode_dataset
    from finetune.data.sources import resolve_sources
    from finetune.model.builtin import resolve_data_path
    from finetune.recipe.schema import DataSection, DatasetSpec

    spec = DatasetSpec(path=f"builtin:{name}", **spec)
    dataset, audit = encode_dataset(spec, "data.train[0]", resolve_sources(spec, "data.train[0]"),
                                    section=DataSection(train=[spec]), tokenizer=tokenizer,
                                    template=tokenizer.chat_template, max_length=4096, preference=False)
    lines = Path(resolve_data_path(spec.path)).read_text().splitlines()
    return dataset, audit, {f"{spec.path}:{n}": json.loads(line) for n, line in enumerate(lines, start=1)}


def test_labels_cover_exactly_the_assistant_tokens(torch_one_thread):
    from transformers import AutoTokenizer

    from finetune.model.builtin import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    dataset, audit, rows = encode_builtin("sample_chat.jsonl", tokenizer, max_rows=40)
    assert audit.kept == len(dataset) == 40
    for item in dataset:
        trained = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != -100]
        messages = rows[item["source"]]["messages"]
        expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert tokenizer.decode(trained) == expected, item["source"]


def test_sft_qlora_trains_on_a_4bit_base_and_merges_unquantised(tmp_path, torch_one_thread):
    pytest.importorskip("bitsandbytes")
    from finetune.merge.bake import run_merge

    run_dir = train(make_recipe(tmp_path, "qlora", **QLORA))
    assert_loss_falls(run_dir)
    out = run_merge(run_dir, log=lambda _: None)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["adapter_kind"] == "qlora" and "not into the 4-bit" in report["merged_into"]
    assert report["saved_dtype"] == "float32" and report["max_abs_logit_diff"] < 1e-4


def test_sft_full_trains_a_complete_model_and_merge_refuses(tmp_path, torch_one_thread):
    from transformers import AutoModelForCausalLM

    run_dir = train(make_recipe(tmp_path, "full", **FULL))
    assert_loss_falls(run_dir)
    AutoModelForCausalLM.from_pretrained(run_dir / "model")
    refused = run_cli("merge", str(run_dir))
    assert refused.returncode == 2 and "nothing to merge" in refused.stderr


def test_prompt_completion_trains_completion_and_eos_only(tmp_path, torch_one_thread):
    from transformers import AutoTokenizer

    from finetune.model.builtin import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    dataset, _, rows = encode_builtin("sample_prompt_completion.jsonl", tokenizer, format="prompt_completion",
                                      max_rows=20)
    assert len(dataset) == 20
    for item in dataset:
        trained = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != -100]
        assert tokenizer.decode(trained) == rows[item["source"]]["completion"] + tokenizer.eos_token, item["source"]
    run_dir = train(make_recipe(tmp_path, "pc", data={"train": [
        {"path": "builtin:sample_prompt_completion.jsonl", "format": "prompt_completion", "max_rows": 32}]},
        training={"max_steps": 3}))
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()


def test_dpo_lora_runs_and_logs_rewards(tmp_path, torch_one_thread):
    run_dir = train(make_recipe(
        tmp_path, "dpo", method={"kind": "dpo", "beta": 0.1},
        data={"train": [{"path": "builtin:sample_preference.jsonl", "format": "preference", "max_rows": 32}]},
        training={"learning_rate": 5e-3, "max_steps": 8, "micro_batch_size": 4},
    ))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r or "rewards/margins" in r for r in records), records[0].keys()
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()


def test_bad_data_line_is_reported_before_the_model_loads(tmp_path):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text("\n".join([good] * 56 + ['{"messages": [oops'] + [good] * 3) + "\n")
    path = make_recipe(tmp_path, "bad", data={"train": [{"path": str(data)}]})
    result = invoke_cli("train", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{data}:57: malformed JSON" in result.stderr
    assert "loading" not in result.stderr and not (tmp_path / "runs" / "bad" / "adapter").exists()


def test_merge_verifies_on_the_runs_eval_prompts(tmp_path):
    import json as _json

    from finetune.merge.bake import VERIFY_PROMPTS, verify_prompts
    from finetune.model.builtin import resolve_data_path
    from finetune.recipe import load_recipe as _load

    path = make_recipe(tmp_path, "withevals", data={"eval": [{"path": "builtin:sample_eval_chat.jsonl"}]})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(_load(path).recipe.model_dump(mode="json")))
    text = Path(resolve_data_path("builtin:sample_eval_chat.jsonl")).read_text()
    rows = [_json.loads(line) for line in text.splitlines()]
    expected = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows][:3]
    assert verify_prompts(run_dir, log=lambda _: None) == expected + VERIFY_PROMPTS
    assert verify_prompts(None, log=lambda _: None) == VERIFY_PROMPTS
