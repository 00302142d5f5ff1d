"""Loss masks for chat and prompt/completion rows that are right for any chat template.

TRL's `assistant_only_loss` needs `{% generation %}` markers, which most stock templates lack, so
we compute labels ourselves. A conversation is rendered twice in one call: as the template writes
it, and with a private-use mark after the text of each assistant reply. The two must agree once the
marks are removed. A mark shows where a reply ends; from there we check the reply's text backwards
to find where it starts, move the start back to the end of the template's assistant header (the
text `add_generation_prompt` appends) and move the end forward through the template's end-of-turn
marker. One tokenisation with offsets then labels the tokens.

What is trained, per selected assistant turn: everything the model writes after the generation
prompt, up to and including the end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`,
`</s>`, ...): not the role header, not the whitespace the template puts after the marker. Text the
template adds after the header is trained with the reply (Qwen3's `<think>\\n\\n</think>\\n\\n` on
the last turn, Mistral's space before the reply).

Straddling tokens: a token is trained when its characters overlap a trained span at all, so every
trained character lies in a trained token. This is the rule of transformers'
`return_assistant_tokens_mask` (token of the first character through token of the last).

A template that drops or rewrites a reply's text (Qwen3 drops `<think>` blocks of earlier turns),
or renders a reply differently once it is marked, makes us raise UserError naming the turn: we
never hand back a mask we could not check.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from finetune.data.templates import resolve_chat_template
from finetune.errors import UserError

IGNORE_INDEX = -100
TRAIN_ON = ("all_assistant", "last_assistant", "all")

# Private-use characters: no template or tokenizer gives them a meaning, so they survive rendering.
# Message i's reply is marked with chr(_MARK_BASE + i), so a missing or repeated mark names its turn.
_MARK_BASE = 0xF0000
_MARKS = re.compile("[\U000f0000-\U0010ffff]")
_PROBE = "\ue001"


@dataclass
class Encoded:
    """One tokenised row; `labels` holds the token id where the token is trained, else -100."""

    input_ids: list[int]
    labels: list[int]


def encode_messages(tokenizer, messages, *, chat_template: str, train_on: str = "all_assistant") -> Encoded:
    """Tokenise a conversation and label the tokens of its assistant turns.

    Args:
        tokenizer: A fast (offset-mapping) tokenizer.
        messages: OpenAI-style messages: dicts with `role` and `content`.
        chat_template: Jinja text of the template (see `resolve_chat_template`).
        train_on: `all_assistant`, `last_assistant`, or `all` (every token).

    Raises:
        UserError: No assistant turn, a turn that cannot be located, or nothing to train.
    """
    messages = _clean(messages)
    if train_on == "all":
        text = _render(chat_template, [messages], dict(tokenizer.special_tokens_map))[0]
        return _encode(tokenizer, text, [(0, len(text))])
    text, spans = _locate(tokenizer, messages, chat_template, set(_select(messages, train_on)))
    return _encode(tokenizer, text, spans)


def encode_prompt_completion(tokenizer, prompt, completion, *, chat_template: str | None) -> Encoded:
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
    text, spans = _locate(tokenizer, messages, template, set(selected))
    return _encode(tokenizer, text, spans)


def _encode_text_pair(tokenizer, prompt: str, completion: str) -> Encoded:
    eos = tokenizer.eos_token
    if not eos:
        raise UserError("The tokenizer has no eos_token, so the model could not learn to stop a completion.")
    if not completion.endswith(eos):
        completion += eos
    text = prompt + completion
    return _encode(tokenizer, text, [(len(prompt), len(text))])


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


def _locate(tokenizer, messages: list[dict], template: str, selected: set[int]):
    """Render the conversation; return its text and the character spans to train."""
    kwargs = dict(tokenizer.special_tokens_map)
    marked, replies = _mark_replies(messages, selected)
    text, probe = _render(template, [messages, marked], kwargs)
    if _MARKS.search(text):
        raise UserError("The conversation contains characters U+F0000 to U+10FFFF, reserved for loss masks.")
    if _MARKS.sub("", probe) != text:
        raise UserError(
            "The chat template renders assistant replies differently depending on their text, so the "
            "trained tokens cannot be located safely. Use another data.chat_template."
        )
    found = [(match.start(), ord(match.group()) - _MARK_BASE) for match in _MARKS.finditer(probe)]
    _check_marks(messages, selected, [i for _, i in found])
    header, end = _template_markers(template, json.dumps(kwargs, sort_keys=True, default=str))
    marks = [mark for mark, _ in found]
    spans = []
    for k, (mark, i) in enumerate(found):
        if i not in selected:
            continue
        # Each turn is searched between its neighbours' marks, never across them.
        lo, hi = (marks[k - 1] + 1 if k else 0), (marks[k + 1] if k + 1 < len(marks) else len(probe))
        start = _turn_start(probe, replies[i], mark, lo, header)
        stop = _turn_stop(probe, messages[i], mark, hi, end)
        if start is None or stop is None:
            raise UserError(_unlocated(messages, i, start is None, end))
        # Positions in the marked text less the marks before them are positions in `text`.
        spans.append((start - bisect.bisect_left(marks, start), stop - bisect.bisect_left(marks, stop)))
    return text, spans


def _check_marks(messages: list[dict], selected: set[int], found: list[int]) -> None:
    """Each trained reply must appear exactly once in the rendered text."""
    for i in sorted(selected):
        if found.count(i) != 1:
            how = "drops its text" if i not in found else "writes its text more than once"
            raise UserError(f"{_turn(messages, i)} could not be located: the chat template {how}.")


def _mark_replies(messages: list[dict], selected: set[int]) -> tuple[list[dict], dict[int, str]]:
    """Copy the messages with a mark after each assistant reply's text; also return those texts."""
    marked, replies = [], {}
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and _text_of(message).strip():
            replies[i] = _text_of(message).rstrip()
            message = {**message, "content": _with_mark(message["content"], chr(_MARK_BASE + i))}
        elif i in selected:
            raise UserError(f"{_turn(messages, i)} has no text to train on (replies without text are not supported).")
        marked.append(message)
    return marked, replies


def _text_of(message: dict) -> str:
    """A message's text: its string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if _is_text_part(part))
    return content if isinstance(content, str) else ""


def _with_mark(content, mark: str):
    """The content with `mark` after its last non-space character (before trailing whitespace)."""
    if isinstance(content, str):
        body = content.rstrip()
        return body + mark + content[len(body) :]
    last = max(j for j, part in enumerate(content) if _is_text_part(part) and part["text"].strip())
    return [{**part, "text": _with_mark(part["text"], mark)} if j == last else part for j, part in enumerate(content)]


def _is_text_part(part) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _turn_start(probe: str, reply: str, mark: int, lo: int, header: str) -> int | None:
    """Where the trained span of a reply ending at `mark` starts, or None if its text is not there."""
    start = _reply_start(probe, reply, mark, lo)
    if start is None:
        return None
    if header:
        found = probe.rfind(header, lo, start)
        return found + len(header) if found >= 0 else start
    # No generation prompt (Mistral): the model writes everything after the user's turn, which
    # includes the space or newline the template puts before the reply.
    while start > lo and probe[start - 1].isspace():
        start -= 1
    return start


def _reply_start(probe: str, reply: str, mark: int, lo: int) -> int | None:
    """Where the reply's first non-space character is, checked backwards from its end."""
    # Leading whitespace is left out: the template's own (a header's newline) can look the same.
    # It is trained anyway when it follows the assistant header, as it then belongs to the reply.
    text = reply.lstrip()
    if mark - len(text) >= lo and probe.startswith(text, mark - len(text)):
        return mark - len(text)
    # Some templates reflow whitespace (Qwen3 rewrites the newlines around <think>): compare the rest.
    pos = mark
    for char in reversed(reply):
        if char.isspace():
            continue
        pos -= 1
        while pos >= lo and probe[pos].isspace():
            pos -= 1
        if pos < lo or probe[pos] != char:
            return None
    return pos


def _turn_stop(probe: str, message: dict, mark: int, hi: int, end: str) -> int | None:
    """Where the trained span ends: after the end-of-turn marker that follows the reply."""
    if not end:  # the template writes nothing after a reply
        return mark
    found = probe.find(end, mark + 1, hi)
    if found < 0 or (probe[mark + 1 : found].strip() and not message.get("tool_calls")):
        return None
    return found + len(end)


@functools.lru_cache(maxsize=32)
def _template_markers(template: str, kwargs_json: str) -> tuple[str, str]:
    """Learn a template's assistant header and end-of-turn marker from two tiny conversations."""
    kwargs = json.loads(kwargs_json)
    mark = chr(_MARK_BASE)
    user, reply = {"role": "user", "content": _PROBE}, {"role": "assistant", "content": mark}
    one, two = _render(template, [[user, reply], [user, reply, user]], kwargs)
    if mark not in one or mark not in two:
        raise UserError("The chat template does not write the text of assistant replies.")
    end = os.path.commonprefix([one.split(mark, 1)[1], two.split(mark, 1)[1]]).rstrip()
    try:
        bare = _render(template, [[user]], kwargs)[0]
        prompted = _render(template, [[user]], kwargs, add_generation_prompt=True)[0]
    except UserError:  # a template may refuse a lone user message; then replies start at their text
        return "", end
    return (prompted[len(bare) :] if prompted.startswith(bare) else ""), end


def _render(template: str, conversations: list, kwargs: dict, add_generation_prompt: bool = False) -> list[str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        texts, _ = render_jinja_template(
            conversations, chat_template=template, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as err:  # the template is user data: its failures are user errors
        raise UserError(f"The chat template failed on this conversation: {type(err).__name__}: {err}") from err
    return texts


def _encode(tokenizer, text: str, spans: list[tuple[int, int]]) -> Encoded:
    bos = _missing_bos(tokenizer, text)
    if bos:
        text = bos + text
        spans = [(start + len(bos), stop + len(bos)) for start, stop in spans]
    ids, offsets = _tokenize(tokenizer, text)
    labels = _labels(ids, offsets, spans)
    if labels.count(IGNORE_INDEX) == len(labels):
        raise UserError("This row has no token to train on.")
    return Encoded(input_ids=ids, labels=labels)


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


def _turn(messages: list[dict], i: int) -> str:
    number = sum(message["role"] == "assistant" for message in messages[: i + 1])
    return f"Assistant turn {number} (message {i})"


def _unlocated(messages: list[dict], i: int, start_missing: bool, end: str) -> str:
    if start_missing:
        why = "the chat template does not write its text as given (Qwen3, for one, drops the <think> block "
        why += "of earlier turns; train on the last assistant turn only, or remove that block)"
    else:
        why = f"the template's end-of-turn marker {end!r} does not follow its text"
    return f"{_turn(messages, i)} could not be located: {why}."
