"""Loss masks for chat and prompt/completion rows, right for any chat template or refused.

TRL's `assistant_only_loss` needs `{% generation %}` markers, which most stock templates lack, so we
compute labels ourselves: `finetune.data.turns` reads each trained turn's span off the template's own
renders (its generation prompt, the reply's text, the end-of-turn text it writes whatever follows), and one
tokenisation with offsets labels the tokens.

What is trained, per selected assistant turn: everything the model writes after the generation prompt, up
to and including the end-of-turn text (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, ...): not the
role header, not the whitespace after the marker, never the next turn's header. Text the template adds
after the generation prompt is trained with the reply (Qwen3's empty `<think>` block on the last turn,
Mistral's space, Command-R7B's `<|START_RESPONSE|>`), and so are tool calls. Tool outputs never train.

Straddling tokens: a token is trained when its characters overlap a trained span at all, so every
trained character lies in a trained token. This is the rule of transformers'
`return_assistant_tokens_mask` (token of the first character through token of the last).

A conversation the template cannot train exactly raises `NotExact` (a UserError that says what to do);
we never hand back a mask we could not check.
"""

from __future__ import annotations

import bisect
import functools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from finetune.data.render import Renderer
from finetune.data.templates import resolve_chat_template
from finetune.data.turns import NotExact, locate_turns
from finetune.errors import UserError

IGNORE_INDEX = -100
TRAIN_ON = ("all_assistant", "last_assistant", "all")
__all__ = ["IGNORE_INDEX", "TRAIN_ON", "Encoded", "NotExact", "encode_messages", "encode_prompt_completion"]


@dataclass
class Encoded:
    """One tokenised row; `labels` holds the token id where the token is trained, else -100.

    `end_of_turn` is what closes the trained turns ("" when the template writes nothing after a reply, so no
    stop token is trained); None where it does not apply (continued pretraining text).
    """

    input_ids: list[int]
    labels: list[int]
    end_of_turn: str | None = None


def encode_messages(tokenizer, messages, *, chat_template: str, train_on: str = "all_assistant",
                    tools: list | None = None, date: str | None = None) -> Encoded:
    """Tokenise a conversation and label the tokens of its assistant turns.

    Args:
        tokenizer: A fast (offset-mapping) tokenizer.
        messages: OpenAI-style messages: dicts with `role`, `content`, optionally `tool_calls`.
        chat_template: Jinja text of the template (see `resolve_chat_template`).
        train_on: `all_assistant`, `last_assistant`, or `all` (every token).
        tools: Tool schemas the template is given (`tools`), as apply_chat_template passes them.
        date: The date a template that prints one shows (ISO); None: today.

    Raises:
        UserError: No assistant turn, a turn the template cannot train exactly (NotExact), or nothing to train.
    """
    messages = _clean(messages)
    renderer = _renderer(tokenizer, chat_template, tools, date)
    if train_on == "all":
        text = renderer.render([messages])[0]
        return _encode(tokenizer, text, [(0, len(text))], None)
    return _encode_turns(tokenizer, renderer, messages, _select(messages, train_on), train_on == "all_assistant")


def encode_prompt_completion(tokenizer, prompt, completion, *, chat_template: str | None,
                             tools: list | None = None, date: str | None = None) -> Encoded:
    """Tokenise a prompt/completion row and label only the completion.

    Plain strings give `prompt + completion + eos_token`. Lists of messages are rendered with the
    chat template (the tokenizer's own when None) and only the completion's assistant turns train.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        return _encode_text_pair(tokenizer, prompt, completion)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise UserError(
            "A prompt/completion row needs two strings or two lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}."
        )
    template = chat_template if chat_template is not None else resolve_chat_template(None, tokenizer)
    messages = _clean(prompt + completion)
    selected = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
    if not selected:
        raise UserError("The completion has no assistant message, so no token would be trained.")
    renderer = _renderer(tokenizer, template, tools, date)
    return _encode_turns(tokenizer, renderer, messages, selected, len(selected) > 1)


def _renderer(tokenizer, template: str, tools, date) -> Renderer:
    return Renderer(template, dict(tokenizer.special_tokens_map), tools=tools or None, date=date)


def _encode_turns(tokenizer, renderer: Renderer, messages, selected: list[int], all_turns: bool) -> Encoded:
    turns = locate_turns(renderer, messages, selected, tokenize=_tail_tokenizer(tokenizer),
                         eos=tokenizer.eos_token, all_turns=all_turns)
    end_of_turn = "" if "" in turns.end_of_turn else turns.end_of_turn[-1]
    return _encode(tokenizer, turns.text, turns.spans, end_of_turn)


def _encode_text_pair(tokenizer, prompt: str, completion: str) -> Encoded:
    eos = tokenizer.eos_token
    if not eos:
        raise UserError("The tokenizer has no eos_token, so the model could not learn to stop a completion.")
    if not completion.endswith(eos):
        completion += eos
    text = prompt + completion
    return _encode(tokenizer, text, [(len(prompt), len(text))], eos)


def _clean(messages) -> list[dict]:
    # Like apply_chat_template, drop keys set to None: datasets fills missing keys with None.
    if not isinstance(messages, list) or not messages:
        raise UserError("A conversation must be a non-empty list of messages.")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise UserError(f"Message {i} of the conversation is not a mapping with a 'role' string.")
        cleaned.append({key: value for key, value in message.items() if value is not None})
    return cleaned


def _select(messages: list[dict], train_on: str) -> list[int]:
    if train_on not in TRAIN_ON:
        raise UserError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}.")
    assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistants:
        raise UserError("The conversation has no assistant message, so no token would be trained.")
    return assistants if train_on == "all_assistant" else assistants[-1:]


def _encode(tokenizer, text: str, spans: list[tuple[int, int]], end_of_turn: str | None) -> Encoded:
    bos = _missing_bos(tokenizer, text)
    if bos:
        text = bos + text
        spans = [(start + len(bos), stop + len(bos)) for start, stop in spans]
    ids, offsets = _tokenize(tokenizer, text)
    labels = _labels(ids, offsets, spans)
    if labels.count(IGNORE_INDEX) == len(labels):
        raise UserError("This row has no token to train on.")
    return Encoded(input_ids=ids, labels=labels, end_of_turn=end_of_turn)


_TAILS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tail_tokenizer(tokenizer):
    """`_tokenize` with a memory, for the end-of-turn texts `locate_turns` compares token by token.

    Those texts repeat from row to row (every reply of a ChatML conversation ends in the same
    `<|im_end|>\n<|im_start|>user\n\ue001...` probe or `<|im_end|>\n` tail), and a call into the tokenizer costs
    ~35 us however short the text: half of them are answered from here (scripts/bench_data.py measures it).
    """
    cached = _TAILS.get(tokenizer)
    if cached is None:
        owner = weakref.ref(tokenizer)  # the cache must not keep its tokenizer alive
        cached = functools.lru_cache(maxsize=4096)(lambda text: _tokenize(owner(), text))
        _TAILS[tokenizer] = cached
    return cached


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; the text carries its own special tokens (and BOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The Rust tokenizer itself costs a third of the call through transformers, but it keeps any
    # truncation or padding an earlier call switched on: then go through transformers, which resets.
    if backend is not None and backend.truncation is None and backend.padding is None:
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise UserError("Loss masks need a fast tokenizer (one with offset mapping).") from err
    return list(encoding["input_ids"]), encoding["offset_mapping"]


def _labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Label every token whose characters overlap a span (offsets are sorted, so bisect works)."""
    starts = [start for start, _ in offsets]
    stops = [stop for _, stop in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop in spans:
        first, last = bisect.bisect_right(stops, start), bisect.bisect_left(starts, stop)
        labels[first:last] = ids[first:last]
    return labels


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _missing_bos(tokenizer, text: str) -> str:
    """The BOS text to prepend: only when the tokenizer adds one by default and the text lacks it."""
    bos = tokenizer.bos_token
    if not bos or text.startswith(bos):
        return ""
    if tokenizer not in _ADDS_BOS:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        _ADDS_BOS[tokenizer] = with_special[:1] == [tokenizer.bos_token_id] != without[:1]
    return bos if _ADDS_BOS[tokenizer] else ""
