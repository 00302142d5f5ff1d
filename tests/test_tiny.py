"""Tests for the offline tiny-model kit and the shipped sample data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.model import builtin, tiny

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FIXED_INPUT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
]


@pytest.fixture(scope="module")
def tokenizer():
    """One trained tokenizer for the whole module (training takes ~0.5 s)."""
    return tiny.build_tokenizer()


def logits_of(model, tokenizer) -> torch.Tensor:
    """Logits of the model on a fixed prompt."""
    ids = tokenizer(FIXED_INPUT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def load(path):
    """Reload a saved model and tokenizer the way users do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_tokenizer_is_deterministic(tokenizer):
    again = tiny.build_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) <= 1024
    # Special tokens must be single tokens, or the chat masks and stopping break.
    for token in tiny.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize(
    "text", ["What is the capital of France?", "Hello,  world!\n\tÉmigré café 42 — naïve 🙂 zxqv"]
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n"
        "<|im_start|>assistant\n3 plus 4 is 7.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == FIXED_INPUT


def test_assistant_mask_covers_replies_and_im_end(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "The capital of France is Paris.<|im_end|>3 plus 4 is 7.<|im_end|>"
    # The newline after each <|im_end|> is outside the mask: the mask ends on <|im_end|>.
    ends = [k for k in range(len(mask) - 1) if mask[k] and not mask[k + 1]]
    assert [tokenizer.convert_ids_to_tokens(ids[k]) for k in ends] == ["<|im_end|>", "<|im_end|>"]
    assert mask[-1] == 0 and tokenizer.decode(ids[-1:]) == "\n"


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="Unsupported role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_same_seed_same_weights(arch):
    (a, tok), (b, _) = tiny.init_tiny_model(arch=arch, seed=3), tiny.init_tiny_model(arch=arch, seed=3)
    assert torch.equal(logits_of(a, tok), logits_of(b, tok))
    c, _ = tiny.init_tiny_model(arch=arch, seed=4)
    assert not torch.equal(logits_of(a, tok), logits_of(c, tok))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_parameter_count_and_config(arch):
    model, tok = tiny.init_tiny_model(arch=arch)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000
    assert model.config.vocab_size == len(tok)
    assert not model.config.tie_word_embeddings
    assert model.dtype == torch.float32
    ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    for cfg in (model.config, model.generation_config):
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == ids


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_saved_model_reloads_identically(tmp_path, arch):
    model, tok = tiny.init_tiny_model(arch=arch, seed=0)
    out = tiny.build_tiny_model(tmp_path / "m", arch=arch, seed=0)
    assert out == tmp_path / "m"
    loaded, loaded_tok = load(out)
    assert type(loaded) is type(model)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded_tok.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    assert torch.equal(logits_of(loaded, loaded_tok), logits_of(model, tok))
    assert loaded.generation_config.eos_token_id == tok.eos_token_id


def test_pretraining_lowers_the_loss_and_is_deterministic():
    losses = []
    for _ in range(2):
        model, tok = tiny.init_tiny_model()
        losses.append(tiny.pretrain(model, tok, steps=30, seed=1))
    assert losses[0] == losses[1]
    # From ln(vocab) ~ 6.9 at random init. Measured 2026-11-29 with `scripts/seed_margins.py --seeds 0-7,42`
    # (docs/testing.md): 1.48-3.01 over init and data seeds 0-7 and 42; bound 4.5.
    assert losses[0] < 4.5


def test_build_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.init_tiny_model()
    assert torch.equal(torch.rand(3), expected)


def read_rows(name: str) -> list[dict]:
    """Parse one shipped JSONL file."""
    path = builtin.BUILTIN_DATA_DIR / name
    assert path.stat().st_size < 100_000
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_messages(messages: list[dict]) -> None:
    """An optional system message, then alternating user/assistant turns ending on the assistant."""
    if messages[0]["role"] == "system":
        messages = messages[1:]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert len(messages) in (2, 4)
    assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)


@pytest.mark.parametrize(
    ("name", "low", "high"), [("sample_chat.jsonl", 250, 350), ("sample_eval_chat.jsonl", 20, 40)]
)
def test_chat_data_shape(name, low, high):
    rows = read_rows(name)
    assert low <= len(rows) <= high
    for row in rows:
        assert set(row) == {"messages"}
        check_messages(row["messages"])


def test_chat_data_mix_and_quickstart_pair():
    rows = read_rows("sample_chat.jsonl")
    system = sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows)
    multi = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in rows) / len(rows)
    assert 0.1 <= system <= 0.3 and 0.15 <= multi <= 0.35
    pair = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    hits = sum(any(r["messages"][k : k + 2] == pair for k in range(len(r["messages"]))) for r in rows)
    assert hits >= 5


def test_eval_rows_are_held_out():
    train = {json.dumps(r, sort_keys=True) for r in read_rows("sample_chat.jsonl")}
    assert not any(json.dumps(r, sort_keys=True) in train for r in read_rows("sample_eval_chat.jsonl"))


def test_prompt_completion_data_shape():
    rows = read_rows("sample_prompt_completion.jsonl")
    assert 150 <= len(rows) <= 250
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        assert row["completion"].startswith(" ") and row["completion"].strip()


def test_preference_data_shape():
    rows = read_rows("sample_preference.jsonl")
    assert 150 <= len(rows) <= 250
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_shipped_data_matches_generator(tmp_path):
    script = REPO / "scripts" / "make_sample_data.py"
    if not script.is_file():
        pytest.skip("installed without the repository's scripts/")
    subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path)], check=True, capture_output=True)
    for name in tiny.TOKENIZER_CORPUS_FILES:
        assert (tmp_path / name).read_bytes() == (builtin.BUILTIN_DATA_DIR / name).read_bytes(), name
