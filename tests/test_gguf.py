"""GGUF proven in llama.cpp itself (the xllamacpp wheel): every supported architecture and tokenizer kind x
output type, compared with transformers on the same tokens; the quickstart's GGUF; refusals before any merge."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from finetune.errors import UserError
from tests.conftest import REPO, library_notices, run_cli

pytestmark = pytest.mark.slow

QUANTS = ("f32", "f16", "bf16", "q8_0")
# Worst |log p(token)| difference, llama.cpp vs transformers (fp32) on the same tokens, allowed per output type.
# Measured on the five models below (scripts/gguf_roundtrip.py, table in docs/after-training.md), worst over them:
# f32 1.6e-3, f16 2.9e-3, bf16 1.8e-2, q8_0 1.8e-1; the limits are 3-4x those. llama.cpp's f32 is not bit-equal to
# torch (other kernels, accumulation order), hence a limit above 0 for f32 too. Every token must also be
# transformers' top token.
LOGPROB_LIMIT = {"f32": 6e-3, "f16": 1.2e-2, "bf16": 8e-2, "q8_0": 0.6}
QUESTIONS = ["What is the capital of France?", "What is 3 plus 4?", "Spell the word cat backwards.",
             "What is the opposite of fast?"]


def _pretrained(config, tokenizer, out: Path, steps: int = 60) -> Path:
    """A tiny model of `config`, pretrained briefly on the sample data (random weights give near-ties everywhere,
    which makes "same top token" a coin toss), saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model.tiny import pretrain

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    pretrain(model, tokenizer, steps=steps)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sentencepiece_tokenizer(out: Path):
    """A SentencePiece BPE model with byte fallback trained on the sample data (as Llama 2 and Mistral ship), loaded
    by transformers (which converts it to tokenizer.json, as it does for a real tokenizer.model), with ChatML."""
    import sentencepiece
    from transformers import LlamaTokenizer

    from finetune.model.tiny import CHAT_TEMPLATE, IM_END, IM_START, tokenizer_corpus

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2, num_threads=1,
    )
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(out, chat_template=CHAT_TEMPLATE)
    (out / "tokenizer.model").unlink()  # what transformers 5 saves: tokenizer.json only
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.eos_token, tokenizer.pad_token = IM_END, tokenizer.unk_token
    return tokenizer


def build_models(tmp: Path) -> dict[str, Path]:
    """One model per supported architecture and llama.cpp tokenizer kind (also used by scripts/gguf_roundtrip.py)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from finetune.model.builtin import resolve_model_path
    from finetune.model.tiny import build_tokenizer

    shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
    bpe = build_tokenizer()
    qwen2 = Qwen2Config(**shape, vocab_size=len(bpe), tie_word_embeddings=True, eos_token_id=bpe.eos_token_id,
                        pad_token_id=bpe.pad_token_id)
    found = {
        "llama": Path(resolve_model_path("builtin:tiny-llama")),  # byte-level BPE ("gpt2", GPT-2 split)
        "qwen3": Path(resolve_model_path("builtin:tiny-qwen3")),  # head_dim 32 (GGUF key_length, not 128)
        "qwen2": _pretrained(qwen2, bpe, tmp / "qwen2"),  # tied embeddings
    }
    for arch, config_class in (("llama-sentencepiece", LlamaConfig), ("mistral-sentencepiece", MistralConfig)):
        tokenizer = sentencepiece_tokenizer(tmp / arch)
        config = config_class(**shape, head_dim=32, vocab_size=len(tokenizer), tie_word_embeddings=False,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        found[arch] = _pretrained(config, tokenizer, tmp / arch)
    return found


@pytest.fixture(scope="module")
def models(tmp_path_factory, torch_one_thread) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("gguf-models"))


def register_tiny_qwen2(model_dir: Path) -> tuple[dict, str, tuple[str, str]]:
    """(table, hash, entry) that registers the tiny qwen2 model's tokenizer as llama.cpp's "qwen2" pre-tokenizer.

    transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer, which swaps in Qwen's split regex; the tiny
    vocabulary with that split has a hash llama.cpp's table cannot know. With it registered, llama.cpp's Qwen2 split
    is checked against transformers' on it."""
    from transformers import AutoTokenizer

    from finetune.export.gguf_vocab import _table, check_text_hash

    digest = check_text_hash(AutoTokenizer.from_pretrained(model_dir))
    return _table()[1], digest, ("qwen2", "tests: tiny vocabulary, Qwen2 split")


def prompts(model_dir: Path) -> list[str]:
    """Chat prompts at the assistant's turn and mid-question (longer replies), and a bare text for byte-level BPE.

    A SentencePiece tokenizer from transformers 5 adds "▁" only at the very start of a text, which llama.cpp cannot
    express: it matches on text that starts with a special token, as every chat prompt does (gguf_vocab.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in QUESTIONS]
    partial = [text.rsplit("<|im_end|>", 1)[0].rsplit(" ", 2)[0] for text in chat[:2]]  # "...What is the"
    bare = [] if "sentencepiece" in model_dir.name else ["The capital of France is"]
    return chat + partial + bare


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama-sentencepiece", "mistral-sentencepiece"])
def test_llama_cpp_matches_transformers(models, arch, quant, tmp_path, monkeypatch):
    from finetune.export.gguf_writer import write_gguf
    from finetune.export.llama_cpp import compare_with_transformers

    model_dir = models[arch]
    if arch == "qwen2":
        monkeypatch.setitem(*register_tiny_qwen2(model_dir))
    written = write_gguf(model_dir, tmp_path / f"{arch}-{quant}.gguf", quant=quant)
    assert (written.vocab.model == "llama") == ("sentencepiece" in arch)
    result = compare_with_transformers(written.path, model_dir, prompts(model_dir), n_predict=12)
    assert result.positions >= 16, result
    assert result.same_top == result.positions, result
    assert result.max_logprob_diff <= LOGPROB_LIMIT[quant], result


def test_sentencepiece_chat_rows_tokenise_alike_in_llama_cpp(models, tmp_path):
    """Every eval conversation, rendered with the chat template, gives llama.cpp the tokens transformers gives."""
    from transformers import AutoTokenizer

    from finetune.export.gguf_writer import write_gguf
    from finetune.export.llama_cpp import LlamaCpp, check_tokenization

    model_dir = models["llama-sentencepiece"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llama = LlamaCpp(write_gguf(model_dir, tmp_path / "spm.gguf", quant="f32").path)
    rows = (REPO / "finetune/resources/data/sample_eval_chat.jsonl").read_text().splitlines()[:20]
    for row in rows:
        check_tokenization(llama, tokenizer, tokenizer.apply_chat_template(json.loads(row)["messages"], tokenize=False))


def test_llama_cpp_refuses_the_old_pre_tokenizer_name_with_its_reason(models, tmp_path, monkeypatch):
    """The bug this replaces: tokenizer.ggml.pre "gpt2" (llama.cpp spells it "gpt-2"). llama.cpp's own refusal."""
    from finetune.export import gguf_vocab
    from finetune.export.gguf_writer import write_gguf
    from finetune.export.llama_cpp import LlamaCpp

    monkeypatch.setattr(gguf_vocab, "identify", lambda tokenizer, where: gguf_vocab.Vocab("gpt2", "gpt2"))
    out = write_gguf(models["llama"], tmp_path / "old.gguf", quant="f32").path
    with pytest.raises(UserError, match="llama.cpp refuses this file: .*unknown pre-tokenizer type: 'gpt2'"):
        LlamaCpp(out)


def test_pre_tokenizer_is_found_by_llama_cpps_hash(models):
    from transformers import AutoTokenizer

    from finetune.export.gguf_vocab import check_text_hash, identify

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    assert identify(tokenizer, "x").pre == "gpt-2"
    # the same vocabulary with another split (digits one by one) is another pre-tokenizer: not in the table
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    from tokenizers import Tokenizer

    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    digest = check_text_hash(tokenizer)
    with pytest.raises(UserError, match=f"does not know this tokenizer's pre-tokenizer .*{digest}"):
        identify(tokenizer, "x")


def test_quickstart_gguf_loads_and_generates_in_llama_cpp(quickstart):
    import gguf
    from transformers import AutoTokenizer

    from finetune.export.llama_cpp import LlamaCpp, compare_with_transformers

    result = run_cli("export", str(quickstart), "--format", "gguf", "--quant", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "llama.cpp loads" in result.stderr and library_notices(result.stderr) == []
    out = quickstart / "tiny-sft-lora-q8_0.gguf"
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.name").contents() == "tiny-sft-lora"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    merged = quickstart / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    question = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             tokenize=False, add_generation_prompt=True)
    answer = LlamaCpp(out).complete(question, 24).text
    assert "Paris" in answer, answer  # a fact of the training data
    compared = compare_with_transformers(out, merged, [question])
    assert compared.same_top == compared.positions and compared.max_logprob_diff <= LOGPROB_LIMIT["q8_0"], compared


def test_unknown_tokenizer_is_refused_before_the_merge(quickstart, tmp_path):
    """An adapter whose tokenizer llama.cpp would not split like training: refused, with no merge and no file."""
    adapter = tmp_path / "adapter"
    shutil.copytree(quickstart / "adapter", adapter)
    spec = json.loads((adapter / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    (adapter / "tokenizer.json").write_text(json.dumps(spec))
    result = run_cli("export", str(adapter), "--format", "gguf")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not know this tokenizer's pre-tokenizer" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no adapter-merged/, no .gguf


def test_unsupported_architecture_is_refused_before_the_merge(quickstart, tmp_path):
    from finetune.export.gguf import export_gguf

    base = tmp_path / "base"
    shutil.copytree(json.loads((quickstart / "adapter/adapter_config.json").read_text())["base_model_name_or_path"],
                    base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gemma", "architectures": ["GemmaX"]}))
    adapter = tmp_path / "adapter"
    shutil.copytree(quickstart / "adapter", adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(base)}))
    with pytest.raises(UserError, match="supports llama, mistral, qwen2, qwen3 models; this one is 'gemma'"):
        export_gguf(adapter, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
