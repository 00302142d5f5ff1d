"""Golden tests of loss masks on real (tiny, offline) tokenizers and the stock chat templates.

Each family gets a byte-level BPE trained here in milliseconds, with that family's special tokens,
so the rendered text tokenises the way it would with the real tokenizer's special tokens. The test
decodes the trained tokens turn by turn and compares them with hand-written strings.
"""

from __future__ import annotations

import functools
import random

import pytest

from finetune.data.masks import IGNORE_INDEX, encode_messages, encode_prompt_completion
from finetune.data.templates import BUILTIN_TEMPLATES, resolve_chat_template
from finetune.errors import UserError

WORDS = (
    "What is the capital of France Germany Italy Paris Berlin Rome And You are terse Say Pick A or B I "
    "think recall user assistant model system Question Answer colour grass green"
)
# Special tokens per family: (special tokens, bos, eos, tokenizer adds BOS by default)
FAMILIES = {
    "chatml": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", False),
    "llama": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        True,
    ),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", True),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", True),
    "qwen3": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", False),
}
TEMPLATE_FAMILY = {
    "chatml": "chatml",
    "smollm2": "chatml",
    "qwen2.5": "chatml",
    "qwen3": "qwen3",
    "llama-3": "llama",
    "llama-3.2": "llama",
    "gemma": "gemma",
    "gemma-2": "gemma",
    "mistral": "mistral",
}

Q_FRANCE = {"role": "user", "content": "What is the capital of France?"}
SINGLE = [Q_FRANCE, {"role": "assistant", "content": "Paris."}]
WITH_SYSTEM = [
    {"role": "system", "content": "You are terse."},
    Q_FRANCE,
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Germany?"},
    {"role": "assistant", "content": "Berlin."},
]
THREE = [
    Q_FRANCE,
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Germany?"},
    {"role": "assistant", "content": "Berlin."},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome."},
]
CONVERSATIONS = {"single": SINGLE, "system": WITH_SYSTEM, "three": THREE}

CHATML_WITH_MARKERS = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def make_tokenizer(family: str):
    """A shared tokenizer of `family`; tests that change a tokenizer build their own."""
    return build_tokenizer(family)


def build_tokenizer(family: str):
    """A byte-level BPE trained on WORDS with `family`'s special tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos, adds_bos = FAMILIES[family]
    words = WORDS.split()
    corpus = [" ".join(words[i:] + words[:i]) + ".?\n\n" for i in range(len(words))] * 3
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    if adds_bos:  # like the real Llama / Gemma / Mistral tokenizers
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    if family == "qwen3":  # Qwen3 has <think> and </think> as added, non-special tokens
        tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def trained_runs(tokenizer, encoded) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        assert label in (IGNORE_INDEX, token)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]


def expected_turns(template: str, replies: list[str]) -> list[str]:
    """What each assistant turn trains, written out by hand per template."""
    if template in ("chatml", "smollm2", "qwen2.5"):
        return [f"{reply}<|im_end|>" for reply in replies]
    if template == "qwen3":  # the last turn gets the empty think block the template writes
        return [f"{r}<|im_end|>" for r in replies[:-1]] + [f"<think>\n\n</think>\n\n{replies[-1]}<|im_end|>"]
    if template in ("llama-3", "llama-3.2"):
        return [f"{reply}<|eot_id|>" for reply in replies]
    if template in ("gemma", "gemma-2"):
        return [f"{reply}<end_of_turn>" for reply in replies]
    if template == "mistral":  # no generation prompt: the space before the reply is the model's
        return [f" {reply}</s>" for reply in replies]
    raise AssertionError(template)


def replies_of(messages) -> list[str]:
    return [message["content"] for message in messages if message["role"] == "assistant"]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(BUILTIN_TEMPLATES))
def test_builtin_templates_train_exactly_the_replies(template, conversation):
    messages = CONVERSATIONS[conversation]
    if template in ("gemma-2", "mistral") and messages[0]["role"] == "system":
        pytest.skip("Gemma-2's template refuses system messages, Mistral's drops them (both tested below)")
    tokenizer = make_tokenizer(TEMPLATE_FAMILY[template])
    chat_template = BUILTIN_TEMPLATES[template]
    expected = expected_turns(template, replies_of(messages))

    every = encode_messages(tokenizer, messages, chat_template=chat_template)
    assert trained_runs(tokenizer, every) == expected
    last = encode_messages(tokenizer, messages, chat_template=chat_template, train_on="last_assistant")
    assert trained_runs(tokenizer, last) == expected[-1:]
    assert last.input_ids == every.input_ids


@pytest.mark.parametrize("template", ["llama-3", "gemma", "mistral"])
def test_template_bos_is_not_doubled(template):
    tokenizer = make_tokenizer(TEMPLATE_FAMILY[template])
    encoded = encode_messages(tokenizer, SINGLE, chat_template=BUILTIN_TEMPLATES[template])
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


def test_bos_is_added_once_when_the_template_lacks_it():
    tokenizer = make_tokenizer("llama")  # a Llama tokenizer adds BOS, ChatML does not write it
    encoded = encode_messages(tokenizer, SINGLE, chat_template=BUILTIN_TEMPLATES["chatml"])
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1
    assert trained_runs(tokenizer, encoded) == ["Paris.<|im_end|>"]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_generation_markers_agree_with_transformers(conversation):
    tokenizer = make_tokenizer("chatml")
    messages = CONVERSATIONS[conversation]
    ours = encode_messages(tokenizer, messages, chat_template=CHATML_WITH_MARKERS)
    theirs = tokenizer.apply_chat_template(
        messages,
        chat_template=CHATML_WITH_MARKERS,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ours.input_ids == list(theirs["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in ours.labels] == list(theirs["assistant_masks"])
    assert trained_runs(tokenizer, ours) == [f"{r}<|im_end|>" for r in replies_of(messages)]


def test_replies_hidden_in_headers_and_prompts_are_not_matched():
    # "I" occurs in "[INST]" and the user quotes the answer: only the reply itself may train.
    tokenizer = make_tokenizer("mistral")
    messages = [
        {"role": "user", "content": "Say I"},
        {"role": "assistant", "content": "I"},
        {"role": "user", "content": "Pick A or B: Paris."},
        {"role": "assistant", "content": "Paris."},
    ]
    encoded = encode_messages(tokenizer, messages, chat_template=BUILTIN_TEMPLATES["mistral"])
    assert trained_runs(tokenizer, encoded) == [" I</s>", " Paris.</s>"]


def test_whitespace_around_replies():
    messages = [Q_FRANCE, {"role": "assistant", "content": "  Paris.\n"}]
    llama = make_tokenizer("llama")  # Llama-3 trims replies; ChatML keeps them as written
    encoded = encode_messages(llama, messages, chat_template=BUILTIN_TEMPLATES["llama-3"])
    assert trained_runs(llama, encoded) == ["Paris.<|eot_id|>"]
    chatml = make_tokenizer("chatml")
    encoded = encode_messages(chatml, messages, chat_template=BUILTIN_TEMPLATES["chatml"])
    assert trained_runs(chatml, encoded) == ["  Paris.\n<|im_end|>"]


def test_qwen3_thinking_on_the_last_turn_is_trained():
    tokenizer = make_tokenizer("qwen3")
    template = BUILTIN_TEMPLATES["qwen3"]
    for reply in ("<think>\nI recall.\n</think>\n\nParis.", "<think>I recall.</think>Paris."):
        encoded = encode_messages(
            tokenizer, [Q_FRANCE, {"role": "assistant", "content": reply}], chat_template=template
        )
        assert trained_runs(tokenizer, encoded) == ["<think>\nI recall.\n</think>\n\nParis.<|im_end|>"]


def test_qwen3_dropped_thinking_is_an_error_not_a_wrong_mask():
    tokenizer = make_tokenizer("qwen3")
    messages = [dict(message) for message in THREE]
    messages[1]["content"] = "<think>\nI recall.\n</think>\n\nParis."
    with pytest.raises(UserError, match=r"Assistant turn 1 \(message 1\).*does not write this reply's text.*<think>"
                       r".*train_on: last_assistant"):
        encode_messages(tokenizer, messages, chat_template=BUILTIN_TEMPLATES["qwen3"])
    last = encode_messages(tokenizer, messages, chat_template=BUILTIN_TEMPLATES["qwen3"], train_on="last_assistant")
    assert trained_runs(tokenizer, last) == ["<think>\n\n</think>\n\nRome.<|im_end|>"]


def test_train_on_all_trains_every_token():
    tokenizer = make_tokenizer("chatml")
    encoded = encode_messages(tokenizer, SINGLE, chat_template=BUILTIN_TEMPLATES["chatml"], train_on="all")
    assert encoded.labels == encoded.input_ids


def test_prompt_completion_plain_strings():
    tokenizer = make_tokenizer("mistral")
    encoded = encode_prompt_completion(
        tokenizer, "Question: What colour is grass?\nAnswer:", " green", chat_template=None
    )
    assert trained_runs(tokenizer, encoded) == [" green</s>"]
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


def test_prompt_completion_conversational():
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    encoded = encode_prompt_completion(tokenizer, THREE[:5], THREE[5:], chat_template=None)
    assert trained_runs(tokenizer, encoded) == ["Rome.<|im_end|>"]


def test_error_nothing_to_train():
    tokenizer = make_tokenizer("chatml")
    with pytest.raises(UserError, match="no assistant message"):
        encode_messages(tokenizer, [Q_FRANCE], chat_template=BUILTIN_TEMPLATES["chatml"])
    with pytest.raises(UserError, match="no assistant message"):
        encode_prompt_completion(
            tokenizer, [Q_FRANCE], [{"role": "user", "content": "Hi"}], chat_template=BUILTIN_TEMPLATES["chatml"]
        )
    with pytest.raises(UserError, match="has neither text nor a tool call to train on"):
        encode_messages(
            tokenizer, [Q_FRANCE, {"role": "assistant", "content": " "}], chat_template=BUILTIN_TEMPLATES["chatml"]
        )


def test_stock_mistral_template_dropping_the_system_prompt_is_refused():
    # Upstream behaviour: the system prompt only goes into a final user message, so a finished
    # conversation would be trained without it. Refused, saying what to do, rather than trained silently.
    tokenizer = make_tokenizer("mistral")
    for train_on in ("all_assistant", "last_assistant"):
        with pytest.raises(UserError, match=r"Message 0 \(system\).*drops this system prompt.*first user message"):
            encode_messages(tokenizer, WITH_SYSTEM, chat_template=BUILTIN_TEMPLATES["mistral"], train_on=train_on)


def test_error_template_refusing_the_conversation():
    with pytest.raises(UserError, match="System role not supported"):
        encode_messages(make_tokenizer("gemma"), WITH_SYSTEM, chat_template=BUILTIN_TEMPLATES["gemma-2"])


def test_error_template_that_renders_replies_by_their_text():
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['content'].endswith('.') %}{{ m['content'] }}"
        "{% else %}{{ m['content'] + '.' }}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    )
    with pytest.raises(UserError, match="depending on their text"):
        encode_messages(make_tokenizer("chatml"), SINGLE, chat_template=template)


def test_resolve_builtin_tokenizer_and_file(tmp_path):
    tokenizer = build_tokenizer("chatml")
    assert resolve_chat_template("llama-3", tokenizer).startswith("{{- bos_token }}")
    tokenizer.chat_template = CHATML_WITH_MARKERS
    assert resolve_chat_template(None, tokenizer) == CHATML_WITH_MARKERS
    path = tmp_path / "mine.jinja"
    path.write_text(CHATML_WITH_MARKERS)
    assert resolve_chat_template(str(path), tokenizer) == CHATML_WITH_MARKERS


def test_resolve_errors(tmp_path):
    tokenizer = build_tokenizer("gemma")
    tokenizer.chat_template = None
    with pytest.raises(UserError, match=r"no chat template.*data\.chat_template.*chatml.*\.jinja"):
        resolve_chat_template(None, tokenizer)
    with pytest.raises(UserError, match=r"Unknown chat template 'lama-3'\. Did you mean 'llama-3'.*qwen3"):
        resolve_chat_template("lama-3", tokenizer)
    missing = tmp_path / "nope.jinja"
    with pytest.raises(UserError, match="nope.jinja"):
        resolve_chat_template(str(missing), tokenizer)


def test_tool_calls_are_trained_with_their_reply():
    tokenizer = make_tokenizer("chatml")
    call = {"type": "function", "function": {"name": "capital", "arguments": {"country": "France"}}}
    messages = [
        Q_FRANCE,
        {"role": "assistant", "content": "I recall.", "tool_calls": [call]},
        {"role": "tool", "content": "Paris"},
        {"role": "assistant", "content": "Paris."},
    ]
    encoded = encode_messages(tokenizer, messages, chat_template=BUILTIN_TEMPLATES["qwen2.5"])
    tool_call = '<tool_call>\n{"name": "capital", "arguments": {"country": "France"}}\n</tool_call>'
    assert trained_runs(tokenizer, encoded) == [f"I recall.\n{tool_call}<|im_end|>", "Paris.<|im_end|>"]
    # Llama-3 writes a tool call instead of the reply's text: the text would be lost, so the row is refused,
    # whichever turn is trained; without the text the same turn trains its call.
    llama = make_tokenizer("llama")
    for train_on in ("all_assistant", "last_assistant"):
        with pytest.raises(UserError, match=r"Message 1 \(assistant\).*writes only the tool calls.*drops its text"):
            encode_messages(llama, messages, chat_template=BUILTIN_TEMPLATES["llama-3"], train_on=train_on)
    no_text = [messages[0], {**messages[1], "content": ""}, *messages[2:]]
    encoded = encode_messages(llama, no_text, chat_template=BUILTIN_TEMPLATES["llama-3"])
    call = '{"name": "capital", "parameters": {"country": "France"}}'
    assert trained_runs(llama, encoded) == [f"{call}<|eot_id|>", "Paris.<|eot_id|>"]


def test_truncation_left_on_the_tokenizer_is_ignored():
    tokenizer = build_tokenizer("chatml")
    tokenizer("What is the capital", truncation=True, max_length=2)  # leaves truncation on in Rust
    encoded = encode_messages(tokenizer, THREE, chat_template=BUILTIN_TEMPLATES["chatml"])
    assert trained_runs(tokenizer, encoded) == ["Paris.<|im_end|>", "Berlin.<|im_end|>", "Rome.<|im_end|>"]


def test_token_straddling_prompt_and_completion_is_trained():
    tokenizer = make_tokenizer("mistral")  # " Paris" is one token: it starts in the prompt
    encoded = encode_prompt_completion(tokenizer, "What is the capital of France? Pa", "ris.", chat_template=None)
    assert trained_runs(tokenizer, encoded) == [" Paris.</s>"]


def prefix_reference(tokenizer, template: str, messages) -> list[int]:
    """Labels from prefix renders: a turn is what follows the generation prompt, whitespace-trimmed."""
    render = tokenizer.apply_chat_template
    text = render(messages, chat_template=template, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = render(messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True)
            turn = render(messages[: i + 1], chat_template=template, tokenize=False)[len(before) :]
            spans.append((len(before), len(before) + len(turn.rstrip())))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    overlaps = [any(a < stop and b > start for start, stop in spans) for a, b in encoding["offset_mapping"]]
    return [token if hit else IGNORE_INDEX for token, hit in zip(encoding["input_ids"], overlaps, strict=True)]


@pytest.mark.parametrize("template", ["chatml", "llama-3", "gemma", "mistral"])
def test_random_conversations_match_prefix_renders(template):
    # These templates are prefix-stable (Mistral without a system message), so rendering prefixes
    # gives an independent answer for replies full of header words, whitespace and brackets.
    rng = random.Random(template)
    pieces = ["Paris", "I", "A", "assistant", "model", "user", " ", "\n", "\n\n", ".", "[INST]", "x y", "<"]
    tokenizer = make_tokenizer(TEMPLATE_FAMILY[template])
    for _ in range(40):
        messages = []
        for _ in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
                messages.append({"role": role, "content": text + ("." if role == "assistant" else "")})
        encoded = encode_messages(tokenizer, messages, chat_template=BUILTIN_TEMPLATES[template])
        assert encoded.labels == prefix_reference(tokenizer, BUILTIN_TEMPLATES[template], messages), messages
