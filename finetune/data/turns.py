"""Where each trained assistant turn lies in a rendered conversation, read off the template's own renders.

No marker is guessed from a template's text. For every trained turn i the template itself is asked three
questions, by rendering prefixes of the conversation:

- where the turn starts: at the end of `render(messages[:i], add_generation_prompt=True)`, the prompt a model
  gets when it writes reply i; the whole conversation must begin with exactly that prompt;
- where the reply's own text is: a private-use mark is put after each message's text (after a tool call's
  name when a reply is only tool calls) and located in the render;
- what closes the turn: the text after the reply that the template writes whatever follows it, i.e. the
  part shared, token for token, by the conversation as it goes on, the conversation cut after the reply, and
  (for a final reply) the conversation followed by another user message; trailing whitespace is left out,
  and nothing after the tokenizer's eos token is trained (the model stops there).

So a turn trains the text the model writes after its prompt (role text the template puts after the
generation prompt, reasoning, the reply, its tool calls) and the end-of-turn text, never a following header.

A conversation the template cannot train exactly raises `NotExact`, which says what to do (another
`data.chat_template`, or `data.train_on: last_assistant`): a template that renders the text before a reply
differently from its generation prompt (it moves a system prompt, adds a `<think>` opening to the prompt
only), that drops or rewrites a message or a trained reply (Qwen3 and DeepSeek-R1 drop earlier reasoning;
Llama 3 drops the text of a turn with tool calls), or that ends a reply differently depending on what
follows (gpt-oss: `<|return|>` last, `<|end|>` otherwise). A template that writes nothing after a reply
trains no stop token: allowed, and reported in the audit (`end_of_turn`).
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from finetune.data.render import Renderer
from finetune.errors import UserError

# Message i's text is marked with chr(_MARK_BASE + i), its reasoning with chr(_REASONING_BASE + i).
_MARK_BASE = 0xF0000
_REASONING_BASE = 0xF8000
_MARKS = RESERVED = re.compile("[\U000f0000-\U0010ffff]")
_PROBE_USER = {"role": "user", "content": "\ue001"}
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class NotExact(UserError):
    """The chat template cannot train this conversation exactly; the message says what to do instead."""


@dataclass(frozen=True)
class Turns:
    """A rendered conversation and what in it is trained."""

    text: str
    spans: list[tuple[int, int]]  # character spans of the trained turns
    end_of_turn: list[str]  # what closes each trained turn ("" when the template writes nothing)


def locate_turns(renderer: Renderer, messages: list[dict], selected: list[int], *,
                 tokenize: Callable[[str], tuple[list[int], list[tuple[int, int]]]], eos: str | None,
                 all_turns: bool) -> Turns:
    """Render the conversation and find the trained span of each selected assistant turn.

    Args:
        renderer: The chat template and what it renders with.
        messages: The conversation (cleaned: dicts with a role).
        selected: Indices of the assistant messages to train, ascending.
        tokenize: (text, n) -> (token ids, character offsets) of the text's start, far enough past character n
            that the tokens up to n are those of the whole text; without special-token insertion.
        eos: The tokenizer's eos token text; nothing after it is part of a turn.
        all_turns: Every assistant turn is trained (data.train_on: all_assistant), for the advice given.
    """
    marked, kinds = _mark(messages, selected)
    plain, full = renderer.render([messages, marked])
    if _MARKS.search(plain):
        raise UserError("The conversation contains characters U+F0000 to U+10FFFF, reserved for loss masks.")
    if _MARKS.sub("", full) != plain:
        raise UserError(
            "The chat template renders messages differently depending on their text, so the trained tokens "
            "cannot be located safely. Use another data.chat_template."
        )
    _check_nothing_dropped(messages, marked, full)
    last = len(messages) - 1
    prompts = _render_prefixes(renderer, [marked[:i] for i in selected], prompt=True)
    ends = _render_prefixes(renderer, [marked[: i + 1] for i in selected if i < last])
    probe = _render_prefixes(renderer, [marked + [_PROBE_USER]])[0] if selected[-1] == last else None
    marks = [m.start() for m in _MARKS.finditer(full)]
    ends_by_turn = dict(zip([i for i in selected if i < last], ends, strict=True))
    spans, closings = [], []
    for i, prompt in zip(selected, prompts, strict=True):
        where = _Turn(messages, i, all_turns and i != selected[-1])
        start, anchor = _start_and_anchor(full, prompt, marked[i], kinds[i], where)
        _check_reasoning(messages[i], full, i, where)
        # The turn ending the conversation, and the turn followed by another message: what both write is its own.
        end, following = (ends_by_turn[i], full) if i < last else (full, probe)

        def prompt_always_written(i=i, end=end) -> bool:  # the end's trailer is the next header, always written
            return _render_prefixes(renderer, [marked[: i + 1]], prompt=True)[0] == end

        closing = _closing(end, following, chr(_MARK_BASE + i), tokenize, eos, where, prompt_always_written)
        stop = anchor + 1 + len(closing)
        _check_no_other_message_inside(full, start, stop, i, messages, where)
        spans.append((start - bisect.bisect_left(marks, start), stop - bisect.bisect_left(marks, stop)))
        closings.append(_MARKS.sub("", closing))
    return Turns(plain, spans, closings)


@dataclass(frozen=True)
class _Turn:
    """Names a turn in messages, and knows whether training only the last turn would avoid a problem."""

    messages: list[dict]
    index: int
    earlier: bool  # an earlier turn of an all_assistant conversation: last_assistant would skip it

    def __str__(self) -> str:
        number = sum(m["role"] == "assistant" for m in self.messages[: self.index + 1])
        return f"Assistant turn {number} (message {self.index})"

    def fix(self) -> str:
        if self.earlier:
            return "set data.train_on: last_assistant (only the final reply is trained), or another data.chat_template"
        return "set data.chat_template to a template that renders every turn as it is generated"


def _mark(messages: list[dict], selected: list[int]) -> tuple[list[dict], dict[int, str]]:
    """Copy the messages with a mark after each text; the kind of anchor each trained turn has."""
    marked, kinds = [], {}
    for i, message in enumerate(messages):
        mark = chr(_MARK_BASE + i)
        if text_of(message).strip():
            message = {**message, "content": _with_mark(message["content"], mark)}
            kinds[i] = "text"
        elif message["role"] == "assistant" and _call_names(message):
            message = {**message, "tool_calls": _mark_last_call(message["tool_calls"], mark)}
            kinds[i] = "call"
        elif i in selected:
            raise UserError(f"{_Turn(messages, i, False)} has neither text nor a tool call to train on.")
        if i in selected:
            for key in REASONING_FIELDS:
                if isinstance(message.get(key), str) and message[key].strip():
                    message = {**message, key: _with_mark(message[key], chr(_REASONING_BASE + i))}
        marked.append(message)
    return marked, kinds


def text_of(message: Mapping) -> str:
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


def _call_names(message: Mapping) -> list[str]:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return []
    return [_function(call).get("name") for call in calls if isinstance(_function(call).get("name"), str)]


def _function(call) -> Mapping:
    if not isinstance(call, Mapping):
        return {}
    return call["function"] if isinstance(call.get("function"), Mapping) else call


def _mark_last_call(calls: list, mark: str) -> list:
    """The tool calls with `mark` after the last call's function name (the anchor of a reply without text)."""
    last = max(j for j, call in enumerate(calls) if isinstance(_function(call).get("name"), str))
    out = list(calls)
    call = calls[last]
    if isinstance(call.get("function"), Mapping):
        out[last] = {**call, "function": {**call["function"], "name": call["function"]["name"] + mark}}
    else:
        out[last] = {**call, "name": call["name"] + mark}
    return out


def _render_prefixes(renderer: Renderer, conversations: list[list[dict]], prompt: bool = False) -> list[str]:
    if not conversations:
        return []
    try:
        return renderer.render(conversations, add_generation_prompt=prompt)
    except UserError as err:
        raise NotExact(
            f"The chat template fails on a part of this conversation ({err.render()}), so where its assistant "
            "turns begin and end cannot be checked; set data.chat_template to a template that renders every "
            "prefix of a conversation"
        ) from err


def _check_nothing_dropped(messages: list[dict], marked: list[dict], full: str) -> None:
    """Every message with text must appear in the render: a template that leaves one out trains without it."""
    for i, message in enumerate(messages):
        mark = chr(_MARK_BASE + i)
        if marked[i] is message or mark in full:
            continue
        role = message["role"]
        if role == "assistant" and message.get("tool_calls") and text_of(message).strip():
            why = ("writes only the tool calls of this turn and drops its text (Llama 3's template does); put the "
                   "text into an assistant turn of its own, or leave content empty in tool-calling turns")
        elif role == "assistant" and message.get("tool_calls"):
            why = ("does not write the tool calls of this turn (it has no tool-call support); set data.chat_template "
                   "to one that has (e.g. qwen2.5, qwen3, llama-3.2, mistral)")
        elif role == "tool":
            why = ("does not write this tool result (it has no tool role); set data.chat_template to a template with "
                   "tool calls (e.g. qwen2.5, qwen3, llama-3.2, mistral)")
        elif role == "system":
            why = ("drops this system prompt (Mistral's templates, for one, write it only into a final user "
                   "message); put it into the first user message, or set data.chat_template")
        else:
            why = "leaves it out, so the model would be trained without it; set data.chat_template (or map the role)"
        raise NotExact(f"Message {i} ({role}) is not in the rendered conversation: the chat template {why}.")


def _start_and_anchor(full: str, prompt: str, marked: dict, kind: str, where: _Turn) -> tuple[int, int]:
    """Where the turn starts (the end of its generation prompt) and where its anchor mark is."""
    if not full.startswith(prompt):
        at = len(os.path.commonprefix([full, prompt]))
        wanted, found = _MARKS.sub("", prompt[at : at + 40]), _MARKS.sub("", full[at : at + 40])
        raise NotExact(
            f"{where}: the conversation before this reply is not the prompt the model gets when it writes it "
            f"(the template's add_generation_prompt render differs at character {at}: {wanted!r} where the "
            f"conversation has {found!r}), so this turn would be trained in a context the model never sees; "
            f"{where.fix()}"
        )
    mark = chr(_MARK_BASE + where.index)
    anchor = full.find(mark, len(prompt))
    # A reply's text appears once; a tool's name may come back in the tool's result, after the call.
    if anchor < 0 or (kind == "text" and full.count(mark) != 1):
        raise NotExact(f"{where}: the chat template writes this reply more than once or before its prompt; "
                       f"{where.fix()}")
    if kind == "text" and _reply_start(full, text_of(marked).replace(mark, ""), anchor, len(prompt)) is None:
        raise NotExact(
            f"{where}: the chat template does not write this reply's text as given (Qwen3 and DeepSeek-R1, for "
            f"one, drop the <think> block of earlier turns); {where.fix()}"
        )
    return len(prompt), anchor


def _reply_start(full: str, reply: str, mark: int, lo: int) -> int | None:
    """Where the reply's first non-space character is, checked backwards from its mark; None if absent."""
    text = reply.strip()
    if mark - len(text) >= lo and full.startswith(text, mark - len(text)):
        return mark - len(text)
    # Some templates reflow whitespace (Qwen3 rewrites the newlines around <think>): compare the rest.
    pos = mark
    for char in reversed(text):
        if char.isspace():
            continue
        pos -= 1
        while pos >= lo and (full[pos].isspace() or _MARKS.match(full[pos])):
            pos -= 1
        if pos < lo or full[pos] != char:
            return None
    return pos


def _check_reasoning(message: dict, full: str, i: int, where: _Turn) -> None:
    has = any(isinstance(message.get(k), str) and message[k].strip() for k in REASONING_FIELDS)
    if has and chr(_REASONING_BASE + i) not in full:
        raise NotExact(
            f"{where}: the chat template does not write this reply's reasoning (reasoning_content), so the turn "
            "would be trained without it (Qwen3 writes it only after the last user message; most templates never "
            f"do); leave the reasoning out or put it into the content, or {where.fix()}"
        )


def _closing(end: str, following: str, mark: str, tokenize, eos: str | None, where: _Turn,
             prompt_always_written: Callable[[], bool]) -> str:
    """The end-of-turn text after the reply's mark: what the template writes there, followed or not, token for token.

    "" when the template writes nothing after a reply (the next header follows it directly), so no stop token
    is trained. A template that ends the last reply one way and the others another is refused.
    """
    tails = [text[text.index(mark) + 1 :] for text in (end, following)]  # the anchor's first place: this turn
    closing = _shared_start(tails, tokenize).rstrip()
    if eos and eos in closing:  # the model stops at eos: nothing after it is ever generated
        closing = closing[: closing.index(eos) + len(eos)]
    end_tail = _MARKS.sub("", tails[0]).rstrip()
    if closing and (closing.endswith(eos or "\0") or closing == end_tail or not prompt_always_written()):
        return closing
    if not closing and (not end_tail.strip() or prompt_always_written()):
        return closing
    if closing:  # the template always writes the next header, and the shared text runs into it
        raise NotExact(
            f"{where}: the chat template writes {end_tail.strip()[:40]!r} after a reply that ends the conversation, "
            f"always starting the next turn, and the text it shares with a following message ({closing!r}) does not "
            "end in the tokenizer's eos token, so where the reply ends cannot be told; check that the template's "
            "markers are special tokens of this tokenizer, or set data.chat_template"
        )
    raise NotExact(
        f"{where}: the chat template ends a reply with {_MARKS.sub('', tails[0]).strip()[:30]!r} when it ends the "
        f"conversation but with {_MARKS.sub('', tails[1]).strip()[:30]!r} when another message follows, so which "
        "end-of-turn text the model should learn cannot be told; set data.chat_template to a template that closes "
        "every turn the same way"
    )


def _shared_start(tails: list[str], tokenize) -> str:
    """The longest start of all tails made of whole tokens that tokenise the same in each."""
    chars = len(os.path.commonprefix(tails))
    if chars == 0:
        return ""
    runs = [tokenize(tail, chars) for tail in tails]
    end = 0
    for tokens in zip(*(zip(ids, offsets, strict=True) for ids, offsets in runs), strict=False):  # up to the shortest
        if any(token != tokens[0] for token in tokens[1:]):
            break
        end = tokens[0][1][1]
    return tails[0][: min(end, chars)]


def _check_no_other_message_inside(full: str, start: int, stop: int, i: int, messages, where: _Turn) -> None:
    own = {chr(_MARK_BASE + i), chr(_REASONING_BASE + i)}
    for match in _MARKS.finditer(full, start, stop):
        if match.group() not in own:
            other = ord(match.group()) - _MARK_BASE
            raise NotExact(f"{where}: the chat template writes message {other} ({messages[other]['role']}) inside "
                           f"this reply, where it would be trained; {where.fix()}")
