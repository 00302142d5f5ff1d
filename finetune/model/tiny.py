"""Tiny offline models: a byte-level BPE tokenizer and a ~1M-parameter Llama or Qwen3, built in seconds.

The tokenizer is trained on the sample data and the model briefly pretrained on it, with no hub;
`finetune.model.builtin` builds `builtin:tiny-llama` and `builtin:tiny-qwen3` with this module.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from finetune.errors import UserError
from finetune.model.builtin import BUILTIN_DATA_DIR

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# A fixed list rather than a glob, so adding a data file later does not silently change the vocab.
TOKENIZER_CORPUS_FILES = (
    "sample_chat.jsonl",
    "sample_prompt_completion.jsonl",
    "sample_preference.jsonl",
    "sample_eval_chat.jsonl",
)
# Gives the vocabulary common English beyond the sample questions (user prompts in chat demos).
ENGLISH_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you. "
    "This is a small model that was trained to answer simple questions about the world: the "
    "capital of a country, the sum of two numbers, the opposite of a word, the colour of a thing, "
    "and how to spell a short word backwards. It can be wrong, so please check what it says. "
    "Please write a short answer. Yes, no, maybe, and I do not know are all good answers. "
    "What, who, where, when, why and how are question words. One, two, three, four, five, six, "
    "seven, eight, nine and ten are numbers. Tell me a story about a cat and a dog in the park. "
    "Good morning! Can you help me with something? Sure, I would be happy to help. Could you "
    "explain that again, please? Let me think about it for a moment. Here is a simple example: "
    "if you have two apples and you get three more, then you have five apples in total. Thanks "
    "for your question. We went to the market on Monday and bought bread, cheese, fruit and "
    "water. The weather was warm and sunny, but later it started to rain. Learning something "
    "new every day makes people curious, patient and kind. Goodbye, and have a nice evening!"
)

# ChatML. The {% generation %} block covers each assistant reply and its <|im_end|> (the tokens
# trained under assistant-only loss); the newline after it stays outside, as it is never generated.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unsupported role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _iter_strings(value):
    """Yield every string inside a parsed JSON value, in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _iter_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _iter_strings(item)


def tokenizer_corpus() -> list[str]:
    """The texts the tiny tokenizer is trained on: the sample data plus a fixed paragraph."""
    import json

    texts = [ENGLISH_PARAGRAPH]
    for name in TOKENIZER_CORPUS_FILES:
        for line in (BUILTIN_DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(_iter_strings(json.loads(line)))
    return texts


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer with ChatML special tokens and chat template.

    Args:
        vocab_size: Target size including the 256 byte tokens and the special tokens.

    Returns:
        A `PreTrainedTokenizerFast` (`TokenizersBackend` in transformers 5); `<|endoftext|>` is
        pad and bos, `<|im_end|>` is eos. Same inputs give an identical vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=PAD_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def _tiny_config(arch: str, tokenizer):
    """The model config: 4 layers, hidden 128, grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen3": Qwen3Config}
    if arch not in classes:
        raise UserError(f"Unknown tiny architecture {arch!r}; choose one of: {', '.join(sorted(classes))}")
    return classes[arch](
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # Qwen3 defaults to 128 whatever the hidden size
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@contextlib.contextmanager
def _no_progress_bars():
    """Hide transformers' "Writing model shards" bar, which is noise for a 4 MB model."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def init_tiny_model(*, arch: str = "llama", seed: int = 0):
    """Create a random-initialised tiny causal LM and its tokenizer in memory.

    Args:
        arch: "llama" or "qwen3".
        seed: Seed of the weight init; the same seed gives identical weights.

    Returns:
        `(model, tokenizer)`: a float32 `LlamaForCausalLM` or `Qwen3ForCausalLM` of ~1.3M
        parameters with pad/bos/eos ids in its config and generation config.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer()
    config = _tiny_config(arch, tokenizer)
    # Fork the RNG so building a model does not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    return model, tokenizer


def pretrain_corpus() -> list[str]:
    """Plain-text versions of the sample conversations and prompt/completion pairs (no chat markup).

    The held-out eval file is left out, so evaluation still measures generalisation.
    """
    import json

    texts = []
    for name in ("sample_chat.jsonl", "sample_prompt_completion.jsonl"):
        for line in (BUILTIN_DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "messages" in row:
                texts.append(" ".join(m["content"] for m in row["messages"] if m["role"] != "system"))
            else:
                texts.append(row["prompt"] + row["completion"])
    return texts


def pretrain(model, tokenizer, *, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 3e-3) -> float:
    """Full-weight causal-LM training on `pretrain_corpus()`; returns the last loss.

    A random-initialised model with frozen norms and LM head cannot become confident through LoRA
    alone (its logits stay within a few units), so fine-tuning demos and tests need a base that has
    learnt something, like every real base model. A plain loop: importing TRL would cost 10 s here.
    """
    import random

    import torch

    texts, rng = pretrain_corpus(), random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            batch = tokenizer([t + tokenizer.eos_token for t in rng.sample(texts, batch_size)],
                              return_tensors="pt", padding=True)
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def build_tiny_model(
    out_dir: str | os.PathLike, *, arch: str = "llama", seed: int = 0, pretrain_steps: int = 0
) -> Path:
    """Create a tiny model (see `init_tiny_model`), optionally pretrain it, and save it with its tokenizer.

    Args:
        out_dir: Directory to write (created if needed).
        arch: "llama" or "qwen3".
        seed: Seed of the weight init and of the pretraining batches.
        pretrain_steps: Steps of plain-text pretraining on the sample data (0: random weights).

    Returns:
        `out_dir` as a Path, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    model, tokenizer = init_tiny_model(arch=arch, seed=seed)
    if pretrain_steps:
        pretrain(model, tokenizer, steps=pretrain_steps, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
