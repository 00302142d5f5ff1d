"""Every stock chat template in tests/templates/ trains exactly the right tokens, or is refused with a message.

The corpus holds 35 templates as their model makers publish them (tests/templates/SOURCES.md says where each
was read). Each is run on conversations with a system prompt, several turns, tool calls and reasoning, training
every assistant turn and only the last. The result is held against an oracle that shares no code with
finetune.data.turns:

- a turn starts where the template's own `add_generation_prompt` render of the conversation before it ends
  (rendered by transformers); if the conversation does not begin with that prompt, no exact mask exists;
- it ends with the first of the family's stop tokens (its generation config's eos tokens) after the reply's
  text, or at the text when none comes before the next message;
- every message (and a trained reply's reasoning) must appear in the render.

A template the oracle calls exact must give exactly its labels, or be listed in REFUSED with the reason it is
refused; one the oracle cannot call exact must be refused. So the test fails on a wrong mask, on a refusal
nobody expected, and on a refusal that stopped happening.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from finetune.data.masks import IGNORE_INDEX, encode_messages
from finetune.errors import UserError

TEMPLATES = Path(__file__).parent / "templates"
NAMES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))

# (special tokens, bos, eos, tokenizer adds BOS, stop tokens of generation)
CHATML = (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", False, ["<|im_end|>"])
LLAMA3 = (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
           "<|python_tag|>", "<|end_of_text|>"], "<|begin_of_text|>", "<|eot_id|>", True, ["<|eot_id|>", "<|eom_id|>"])
MISTRAL = (["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], "<s>", "</s>", True, ["</s>"])
GEMMA = (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", True, ["<end_of_turn>"])
PHI3 = (["<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>",
        "<|endoftext|>", True, ["<|end|>", "<|endoftext|>"])
COHERE = (["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
           "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>",
           "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"],
          "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", True, ["<|END_OF_TURN_TOKEN|>"])
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DEEPSEEK = ([DS_BOS, DS_EOS, "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
             "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
             "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"],
            DS_BOS, DS_EOS, True, [DS_EOS])
FAMILIES = {
    "command-r": COHERE, "command-r7b": COHERE,
    "deepseek-coder": ([DS_BOS, DS_EOS, "<|EOT|>"], DS_BOS, "<|EOT|>", True, ["<|EOT|>"]),
    "deepseek-r1-distill": DEEPSEEK, "deepseek-v2": DEEPSEEK,
    "gemma": GEMMA, "gemma-2": GEMMA, "gemma-3": GEMMA,
    "gpt-oss": (["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                 "<|return|>", "<|call|>", "<|constrain|>"], "<|startoftext|>", "<|return|>", False,
                ["<|return|>", "<|call|>"]),
    "granite-3.0": (["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"], "<|end_of_text|>",
                    "<|end_of_text|>", False, ["<|end_of_text|>"]),
    "llama-2": (["<s>", "</s>"], "<s>", "</s>", True, ["</s>"]),
    "llama-3": LLAMA3, "llama-3.1": LLAMA3, "llama-3.2": LLAMA3,
    "mistral-7b-v0.1": MISTRAL, "mistral-7b-v0.2": MISTRAL, "mistral-7b-v0.3": MISTRAL,
    "mistral-large-2407": MISTRAL, "mistral-large-2411": MISTRAL, "mistral-nemo": MISTRAL,
    "mistral-small-3.1": MISTRAL,
    "openchat-3.5": (["<s>", "</s>", "<|end_of_turn|>"], "<s>", "<|end_of_turn|>", True, ["<|end_of_turn|>"]),
    "openhermes-chatml": CHATML, "qwen2.5": CHATML, "qwen3": CHATML, "smollm2": CHATML, "smollm3": CHATML,
    "phi-3": PHI3, "phi-3-medium": PHI3, "phi-3.5": PHI3,
    "phi-3-small": (["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|endoftext|>",
                    "<|endoftext|>", False, ["<|end|>", "<|endoftext|>"]),
    "phi-4": (["<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"], "<|endoftext|>", "<|im_end|>", False,
              ["<|im_end|>"]),
    "phi-4-mini": (["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"],
                   "<|endoftext|>", "<|endoftext|>", False, ["<|end|>", "<|endoftext|>"]),
    "seed-oss": (["<seed:bos>", "<seed:eos>"], "<seed:bos>", "<seed:eos>", False, ["<seed:eos>"]),
    "zephyr": (["<s>", "</s>"], "<s>", "</s>", True, ["</s>"]),
}

Q = {"role": "user", "content": "What is the capital of France?"}
CALL = {"id": "call12345", "type": "function", "function": {"name": "capital", "arguments": {"country": "France"}}}
TOOLS = [{"type": "function", "function": {
    "name": "capital", "description": "The capital of a country",
    "parameters": {"type": "object", "properties": {"country": {"type": "string", "description": "A country"}},
                   "required": ["country"]}}}]
CONVERSATIONS = {
    "single": ([Q, {"role": "assistant", "content": "Paris."}], None),
    "system": ([{"role": "system", "content": "You are terse."}, Q, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And Germany?"}, {"role": "assistant", "content": "Berlin."}], None),
    "three": ([Q, {"role": "assistant", "content": " Paris.\n"}, {"role": "user", "content": "And Germany?"},
               {"role": "assistant", "content": "Berlin."}, {"role": "user", "content": "And Italy?"},
               {"role": "assistant", "content": "Rome."}], None),
    "tools": ([Q, {"role": "assistant", "content": "", "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "call12345", "name": "capital", "content": "Paris"},
               {"role": "assistant", "content": "It is Paris."}], TOOLS),
    "reasoning": ([Q, {"role": "assistant", "content": "Paris.", "reasoning_content": "I recall it."},
                   {"role": "user", "content": "And Germany?"},
                   {"role": "assistant", "content": "Berlin.", "reasoning_content": "I know it."}], None),
}

WORDS = ("What is the capital of France Germany Italy Paris Berlin Rome And You are terse It I recall know "
         "user assistant model system country name arguments parameters")

# (template, conversation) -> why it is refused; "*" matches every conversation, ":last" suffixes apply to
# train_on: last_assistant only, ":all" to all_assistant only. Each reason was read off the template.
NO_TOOLS = "no tool-call support"  # the template drops the tool calls (or has no tool role)
ALTERNATE = "roles must alternate"  # the template raises on a tool or system message
NO_REASONING = "does not write this reply's reasoning"
REFUSED: dict[tuple[str, str], str] = {
    # The generation prompt ends in "<think>\n", which the rendered conversation never has.
    ("deepseek-r1-distill", "*"): "'<think>\\n' where the conversation has",
    # "<|return|>" closes the last reply, "<|end|>" every other one.
    ("gpt-oss", "*"): "ends a reply with '<|return|>' when it ends the conversation",
    # No system role: refused by the template itself, or the system prompt is dropped from the render.
    ("gemma", "system"): "System role not supported",
    ("gemma-2", "system"): "System role not supported",
    ("mistral-7b-v0.1", "system"): ALTERNATE,
    ("phi-3-medium", "system"): "drops this system prompt",
    # Mistral's v3 templates put the system prompt into the final user message only.
    ("mistral-7b-v0.3", "system"): "drops this system prompt",
    ("mistral-large-2407", "system"): "drops this system prompt",
    ("mistral-nemo", "system"): "drops this system prompt",
    # Templates without tool calls.
    **{(name, "tools"): NO_TOOLS for name in (
        "deepseek-coder", "deepseek-v2", "granite-3.0", "llama-3", "mistral-7b-v0.3", "openchat-3.5",
        "openhermes-chatml", "phi-3", "phi-3-medium", "phi-3-small", "phi-3.5", "phi-4", "phi-4-mini",
        "seed-oss", "smollm2", "smollm3", "zephyr")},
    **{(name, "tools"): ALTERNATE for name in (
        "command-r", "gemma", "gemma-2", "gemma-3", "llama-2", "mistral-7b-v0.1", "mistral-7b-v0.2")},
    ("mistral-large-2411", "tools"): "Only user, system and assistant roles are supported",
    # Only Qwen3 writes reasoning_content, and only after the last user message.
    **{(name, "reasoning"): NO_REASONING for name in NAMES if name not in ("qwen3", "deepseek-r1-distill", "gpt-oss")},
    ("qwen3", "reasoning:all"): NO_REASONING,
    ("gpt-oss", "reasoning:all"): NO_REASONING,  # it drops the reasoning of earlier turns
    # DeepSeek's template wants tool-call arguments as JSON text, not an object.
    ("deepseek-r1-distill", "tools"): "can only concatenate str",
}


@functools.cache
def tokenizer_for(name: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos, adds_bos, _ = FAMILIES[name]
    words = WORDS.split()
    corpus = [" ".join(words[i:] + words[:i]) + ".?\n\n" for i in range(len(words))] * 3
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)


def oracle(name: str, messages: list[dict], tools, selected: list[int]) -> list[int] | None:
    """Labels from prefix renders and stop tokens, or None when no exact mask exists."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer, template, stops = tokenizer_for(name), (TEMPLATES / f"{name}.jinja").read_text(), FAMILIES[name][4]

    def render(conversation, prompt):
        return render_jinja_template([conversation], chat_template=template, tools=tools,
                                     add_generation_prompt=prompt, **tokenizer.special_tokens_map)[0][0]

    try:
        text = render(messages, False)
        prompts = {i: render(messages[:i], True) for i in selected}
    except Exception:
        return None
    texts = [(m.get("content") or "").strip() for m in messages]
    if any(t and t not in text for t in texts):
        return None
    spans = []
    for i in selected:
        prompt, message = prompts[i], messages[i]
        if not text.startswith(prompt):
            return None
        anchor = texts[i] or message["tool_calls"][-1]["function"]["name"]
        found = text.find(anchor, len(prompt))
        reasoning = message.get("reasoning_content")
        if found < 0 or (reasoning and reasoning not in text[len(prompt):found]):
            return None
        end = found + len(anchor)
        nxt = texts[i + 1] if i + 1 < len(messages) else ""
        bound = text.find(nxt, end) if nxt else len(text)
        hits = [(at, stop) for stop in stops if (at := text.find(stop, end, bound)) >= 0]
        if hits:
            at, stop = min(hits)
            end = at + len(stop)
        spans.append((len(prompt), end))
    bos = tokenizer.bos_token
    encoding = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
    return [token if any(a < stop and b > start and b > a for start, stop in spans) else IGNORE_INDEX
            for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)]


def refusal_reason(name: str, conversation: str, train_on: str) -> str | None:
    suffix = ":last" if train_on == "last_assistant" else ":all"
    for key in ((name, conversation + suffix), (name, conversation), (name, "*" + suffix), (name, "*")):
        if key in REFUSED:
            return REFUSED[key]
    return None


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_every_stock_template_is_exact_or_refused(name, conversation, train_on):
    messages, tools = CONVERSATIONS[conversation]
    tokenizer = tokenizer_for(name)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    selected = assistants if train_on == "all_assistant" else assistants[-1:]
    expected = oracle(name, messages, tools, selected)
    why = refusal_reason(name, conversation, train_on)
    try:
        encoded = encode_messages(tokenizer, messages, chat_template=(TEMPLATES / f"{name}.jinja").read_text(),
                                  train_on=train_on, tools=tools)
    except UserError as err:
        assert why is not None, f"unexpected refusal: {err.render()}"
        assert why in err.render()
        return
    assert why is None, f"expected a refusal ({why}), got a mask"
    assert expected is not None, "the oracle finds no exact mask, yet one was produced"
    assert encoded.labels == expected


def trained_runs(tokenizer, encoded) -> list[str]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]


@pytest.mark.parametrize(("name", "closing"), [
    ("phi-3", "<|end|>"), ("phi-3.5", "<|end|>"), ("phi-4-mini", "<|end|>"),
    ("command-r7b", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
])
def test_templates_that_write_text_after_a_reply_conditionally_train_no_next_header(name, closing):
    # Phi's templates end with `{% else %}{{ eos_token }}` and Command-R7B's always writes the next
    # header: a marker learned from a common prefix came out as '<|end|>\n<|' (training the next turn's
    # '<|user|>') and '...<|START_OF_TURN_TOKEN|><|' respectively.
    messages, _ = CONVERSATIONS["system"]
    tokenizer = tokenizer_for(name)
    encoded = encode_messages(tokenizer, messages, chat_template=(TEMPLATES / f"{name}.jinja").read_text())
    opening = "<|START_RESPONSE|>" if name == "command-r7b" else ""
    assert trained_runs(tokenizer, encoded) == [f"{opening}Paris.{closing}", f"{opening}Berlin.{closing}"]
    assert encoded.end_of_turn == closing


CHATGLM3 = (  # THUDM/chatglm3-6b, as ggml-org/llama.cpp tests/test-chat-template.cpp holds it
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_template_that_writes_nothing_after_a_reply_trains_no_stop_token_and_says_so():
    tokenizer = tokenizer_for("openhermes-chatml")
    messages, _ = CONVERSATIONS["system"]
    encoded = encode_messages(tokenizer, messages, chat_template=CHATGLM3)
    assert trained_runs(tokenizer, encoded) == ["\n Paris.", "\n Berlin."]
    assert encoded.end_of_turn == ""  # the audit counts the row and warns (tests/test_data.py)
