"""After training, on the tiny model: merge extras and refusals, GGUF round trip, vLLM, chat, generate, eval."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.errors import UserError
from tests.conftest import REPO, run_cli
from tests.test_train import make_recipe, train

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def run(tmp_path_factory, torch_one_thread):
    tmp = tmp_path_factory.mktemp("after")
    return train(make_recipe(tmp, "tuned", data={
        "train": [{"path": "builtin:sample_chat.jsonl", "max_rows": 64}],
        "eval": [{"path": "builtin:sample_eval_chat.jsonl", "max_rows": 8}],
    }))


@pytest.fixture(scope="module")
def merged(run):
    from finetune.merge.bake import run_merge

    return run_merge(run, max_shard_size="1MB", log=lambda _: None)  # the default place: <run>/merged


@pytest.fixture(scope="module")
def other_adapter(run, tmp_path_factory):
    """A second LoRA adapter for the same base (random B, so it changes outputs), saved as PEFT saves any."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.model.builtin import resolve_model_path

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("other") / "adapter"
    get_peft_model(base, config).save_pretrained(out)
    return out


def base_path() -> str:
    from finetune.model.builtin import resolve_model_path

    return resolve_model_path("builtin:tiny-llama")


def logits(model, tokenizer, text: str = QUESTION):
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# --- merge -------------------------------------------------------------------------------------


def test_merge_shards_and_carries_tokenizer_template_card_and_provenance(merged, run):
    report = json.loads((merged / "merge_report.json").read_text())
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == report["weight_files"]
    assert report["max_abs_logit_diff"] < 1e-4 and report["greedy_generations_agree"]
    for name in ("chat_template.jinja", "tokenizer.json", "generation_config.json", "README.md"):
        assert (merged / name).is_file(), name
    umask = os.umask(0o022)
    os.umask(umask)
    assert merged.stat().st_mode & 0o777 == 0o777 & ~umask  # not the owner-only mode of its temporary directory
    assert (merged / "provenance/recipe.yaml").read_text() == (run / "recipe.yaml").read_text()
    assert (merged / "provenance/audit.json").is_file()
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.load(merged / "README.md")
    assert isinstance(card.data, ModelCardData) and card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local base means nothing to the Hub: named in the text instead
    assert base_path() in card.text and "passed the limits" in card.text and "finetune-recipes" in card.text
    assert "pypi.org/project/finetune/" not in card.content


def test_cards_have_valid_hub_metadata(run, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    from finetune.run.card import write_card
    from finetune.run.records import Provenance

    adapter_card = ModelCard.load(run / "adapter" / "README.md")
    assert adapter_card.data.library_name == "peft" and adapter_card.data.base_model is None
    provenance = json.loads((run / "provenance.json").read_text())
    assert len(provenance["base_model"]["sha256"]) == 64  # a local base: identified by its content
    assert provenance["base_model"]["sha256"][:16] in adapter_card.text
    provenance["recipe"]["model"]["path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as a run on a Hub base records it
    provenance["base_model"] = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}
    write_card(tmp_path, Provenance.model_validate(provenance), kind="adapter")
    hub = ModelCard.load(tmp_path / "README.md")
    validate_repo_id(hub.data.base_model)
    assert hub.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ModelCard(hub.content).data.to_dict() == hub.data.to_dict()  # the metadata parses back as written


def _adapter_copy(run: Path, tmp_path: Path, base: str, **config) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    data = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**data, "base_model_name_or_path": base, **config}))
    return adapter


def _base_copy(tmp_path: Path, **config) -> Path:
    base = tmp_path / "base"
    shutil.copytree(base_path(), base)
    data = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**data, **config}))
    return base


def test_merge_refuses_prompt_tuning_adapter_from_the_cli(run, tmp_path):
    adapter = _adapter_copy(run, tmp_path, base_path(), peft_type="PROMPT_TUNING")
    result = run_cli("merge", str(adapter))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "a prompt tuning adapter cannot be merged" in result.stderr


def test_merge_refuses_gptq_base(run, tmp_path):
    from finetune.merge.bake import run_merge

    base = _base_copy(tmp_path, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(UserError, match=r"already quantised \(gptq\)"):
        run_merge(_adapter_copy(run, tmp_path, str(base)), log=lambda _: None)
    assert not (tmp_path / "adapter-merged").exists()


def test_merge_refuses_adapter_of_another_shape(run, tmp_path):
    from finetune.merge.bake import run_merge

    base = _base_copy(tmp_path, intermediate_size=256)
    with pytest.raises(UserError, match="does not fit the base") as caught:
        run_merge(_adapter_copy(run, tmp_path, str(base)), log=lambda _: None)
    assert any("mlp.down_proj.lora_A" in p and "384 inputs" in p and "has 256" in p for p in caught.value.problems)


# --- GGUF (compared with transformers in llama.cpp itself: tests/test_gguf.py) -------------------------


def test_export_of_a_run_reuses_its_merge_and_refuses_to_overwrite(run, merged):
    result = run_cli("export", str(run), "--format", "gguf", "--quant", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "using the merged model" in result.stderr
    assert (run / "tuned-q8_0.gguf").stat().st_size > 100_000
    again = run_cli("export", str(run), "--format", "gguf", "--quant", "q8_0")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_gguf_refuses_unsupported_architecture_by_name(tmp_path):
    from finetune.export.gguf_writer import write_gguf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match=r"supports llama, mistral, qwen2, qwen3 models; this one is 'gpt2'"):
        write_gguf(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_llama3_rope_factors_match_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from finetune.export.gguf_writer import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = llama3_rope_factors(config.to_dict() | {"rope_parameters": rope})
    assert factors.min() == 1.0 and factors.max() == 32.0
    torch.testing.assert_close(scaled.double(), plain / torch.from_numpy(factors).double(), rtol=1e-5, atol=0)


# --- vLLM --------------------------------------------------------------------------------------


def test_vllm_command_and_the_adapter_loads_as_is(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("export", str(run), "--format", "vllm", "--name", "mine")
    assert result.returncode == 0, result.stderr
    expected = f"vllm serve {base_path()} --enable-lora --lora-modules mine={(run / 'adapter').resolve()}"
    assert result.stdout.strip() == expected  # rank 8: vLLM's default --max-lora-rank (16) suffices
    base = AutoModelForCausalLM.from_pretrained(base_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    before = logits(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    assert (logits(adapted, tokenizer) - before).abs().max().item() > 1e-2


# --- chat --------------------------------------------------------------------------------------


def test_chat_switches_adapters_on_one_base_and_base_restores_its_outputs(run, other_adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.inference.load import Loaded, Sampling, Source, generate_texts, prompt_text

    script = f"/help\n{QUESTION}\n/reset\n/adapter other\n{QUESTION}\n/reset\n/base\n{QUESTION}\n/quit\n"
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "chat", str(run), "--adapter", f"other={other_adapter}",
         "--max-new-tokens", "16"],
        input=script, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    tuned, other, base_reply = result.stdout.splitlines()
    assert len({tuned, other, base_reply}) == 3, result.stdout
    assert "now: adapter other" in result.stderr and "now: the base model" in result.stderr
    assert result.stderr.count("/help (this list)") == 2  # the greeting, and the answer to /help
    # what the base says on its own, with no PEFT in the process at all
    model = AutoModelForCausalLM.from_pretrained(base_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter", padding_side="left")
    plain = Loaded(model, tokenizer, [], Source(base_path(), str(run / "adapter")), "cpu")
    [expected] = generate_texts(plain, [prompt_text(tokenizer, QUESTION)], Sampling(max_new_tokens=16))
    assert base_reply == expected


# --- generate ----------------------------------------------------------------------------------


def test_generate_is_batched_per_adapter_and_resumes_without_truncating(run, other_adapter, tmp_path):
    from finetune.inference.generate import read_prompts, run_generate
    from finetune.inference.load import Sampling, load, resolve_source

    prompts_file = tmp_path / "prompts.jsonl"
    shutil.copy(REPO / "finetune/resources/data/sample_eval_chat.jsonl", prompts_file)
    prompts = read_prompts(prompts_file)[:5]
    loaded = load(resolve_source(str(run)), [("other", other_adapter)])
    sampling = Sampling(max_new_tokens=12)
    full = tmp_path / "full.jsonl"
    assert run_generate(loaded, prompts, full, sampling, batch_size=3, with_base=True, log=lambda _: None) == 15
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["tuned"] * 5 + ["other"] * 5 + ["base"] * 5
    assert len({r["output"] for r in rows if r["id"] == 1}) == 3  # each model answers differently
    one_by_one = tmp_path / "single.jsonl"
    run_generate(loaded, prompts, one_by_one, sampling, batch_size=1, with_base=True, log=lambda _: None)
    assert one_by_one.read_text() == full.read_text()  # left padding changes nothing

    interrupted = tmp_path / "out.jsonl"
    kept = "".join(full.read_text().splitlines(keepends=True)[:4])
    interrupted.write_text(kept)
    messages = []
    resumed = run_generate(loaded, prompts, interrupted, sampling, batch_size=3, with_base=True, log=messages.append)
    assert resumed == 11
    assert "4 outputs already in" in messages[0]
    assert interrupted.read_text().startswith(kept)
    assert sorted(interrupted.read_text().splitlines()) == sorted(full.read_text().splitlines())


def test_generate_rejects_a_bad_prompts_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    result = run_cli("generate", "builtin:tiny-llama", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and f"{prompts}:2: needs 'prompt'" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


# --- eval --------------------------------------------------------------------------------------


def test_eval_prints_a_before_after_table(run, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    rows = [{"prompt": QUESTION, "answer": "The capital of France is Paris."},
            {"prompt": "Give the capital of France as JSON.", "answer": '{"capital": "Paris"}'}]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("eval", str(run), "--base", "--tasks", str(tasks), "--out", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    header, rule, *lines = result.stdout.splitlines()
    assert header.split() == ["metric", "base", "tuned", "change"]
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines}
    assert set(table) == {"loss", "perplexity", "exact_match", "contains", "json_valid"}
    before, after, change = table["loss"]
    assert after < before and change == pytest.approx(after - before, abs=2e-4)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["tuned"]["loss"] == pytest.approx(after, abs=1e-4)


def test_eval_loss_matches_a_direct_computation(run):
    import torch

    from finetune.inference.evaluate import loss_dataset, mean_loss
    from finetune.inference.load import load, resolve_source
    from finetune.recipe.schema import DataSection, DatasetSpec

    loaded = load(resolve_source(str(run)))
    spec = DatasetSpec(path="builtin:sample_eval_chat.jsonl", max_rows=6)
    dataset = loss_dataset(loaded, [spec], DataSection(train=[spec]), 256)
    batched, tokens = mean_loss(loaded, dataset, batch_size=4)
    total = 0.0
    for row in dataset:  # one row at a time, no padding: what the batched, padded version must equal
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        with torch.no_grad():
            total += loaded.model(input_ids=ids, labels=labels).loss.item() * int((labels[:, 1:] != -100).sum())
    assert batched == pytest.approx(total / tokens, rel=1e-4)


def test_task_metrics():
    from finetune.inference.evaluate import Task, task_metrics

    tasks = [Task("q", "Paris.", False, "1"), Task("q", "7", False, "2"), Task("q", '{"a": 1}', True, "3")]
    metrics = task_metrics(tasks, ["paris", "It is 7.", '```json\n{"a": 2}\n```'])
    assert metrics == {"exact_match": pytest.approx(1 / 3), "contains": pytest.approx(2 / 3), "json_valid": 1.0}


def test_lm_eval_missing_is_a_clear_message(monkeypatch):
    import importlib.util

    from finetune.inference.lm_eval import check_lm_eval

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"lm-evaluation-harness is not installed; install it with: pip install"):
        check_lm_eval()


def test_lm_eval_local_task_runs_on_base_and_tuned(run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from finetune.inference.evaluate import run_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "capitals.jsonl"
    rows = [("The capital of France is", [" Paris.", " Rome."], 0),
            ("The capital of Italy is", [" Paris.", " Rome."], 1)]
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": x}) + "\n" for q, c, x in rows))
    task = tmp_path / "capitals.yaml"
    task.write_text(
        f"task: finetune_test_capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    results = run_eval(str(run), with_base=True, lm_eval_tasks=[str(task)], max_rows=2)
    assert set(results) == {"base", "tuned"}
    for values in results.values():
        assert 0.0 <= values["finetune_test_capitals/acc"] <= 1.0 and "loss" in values


@pytest.mark.parametrize("argv, message", [
    (["export", ".", "--format", "zip"], "--format: expected gguf or vllm, found 'zip'"),
    (["export", "nowhere", "--format", "gguf"], "nowhere: no such directory"),
    (["chat", "builtin:tiny-llama", "--adapter", "noequals"], "--adapter: expected NAME=PATH"),
    (["generate", "x", "--prompts", "missing.jsonl", "--out", "o.jsonl"], "no such file: missing.jsonl"),
    (["eval", "builtin:tiny-llama", "--adapter", "base=x"], "'base' is not a usable name"),
])
def test_bad_input_exits_2_before_loading_a_model(argv, message, tmp_path):
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# --- merge gate --------------------------------------------------------------------------------


def test_merge_over_its_limit_exits_non_zero_and_leaves_nothing(run, tmp_path, monkeypatch):
    from finetune.merge import bake

    monkeypatch.setitem(bake.GATES, "float32", {"max_abs_logit_diff": 1e-12})  # a limit no real merge meets
    with pytest.raises(bake.MergeCheckFailed, match=r"max_abs_logit_diff .* \(limit 1e-12\).*Nothing was written"):
        bake.run_merge(run, out=tmp_path / "m", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # no output, no partial directory
    with pytest.raises(bake.MergeCheckFailed, match="Kept anyway"):
        bake.run_merge(run, out=tmp_path / "m", keep_failed=True, log=lambda _: None)
    report = json.loads((tmp_path / "m/merge_report.json").read_text())
    assert report["gate"]["passed"] is False and report["top_token_agreement"] == 1.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merge_passes_its_gate(run, tmp_path, dtype):
    from finetune.merge.bake import run_merge

    out = run_merge(run, out=tmp_path / "m", dtype=dtype, log=lambda _: None)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["saved_dtype"] == dtype and report["gate"]["passed"], report["gate"]


def test_qlora_merge_reports_its_distance_to_the_4bit_model(tmp_path, torch_one_thread):
    pytest.importorskip("bitsandbytes")
    from finetune.merge.bake import run_merge

    qlora = train(make_recipe(tmp_path, "q", adapter={"kind": "qlora", "r": 8, "alpha": 16, "dropout": 0.0}))
    report = json.loads((run_merge(qlora, log=lambda _: None) / "merge_report.json").read_text())
    trained = report["vs_trained_4bit_model"]
    assert report["max_abs_logit_diff"] < 1e-3  # the merge itself is exact
    assert trained["mean_abs_logit_diff"] > 10 * report["mean_abs_logit_diff"]  # 4-bit rounding of the base
