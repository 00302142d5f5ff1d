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

Speed: where the template provably never looks inside a message's text (finetune.data.skeleton), the turns
are located once per conversation outline (shape and the texts' outer whitespace) and every row of that
outline only fills its texts in (`_outlined`); tests/test_skeleton.py holds both paths to the same result.
"""

from __future__ import annotations

import bisect
import functools
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace

from finetune.data import skeleton
from finetune.data.render import Renderer
from finetune.data.templates import resolve_chat_template
from finetune.data.turns import RESERVED, NotExact, Turns, locate_turns
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
    setup = skeleton.setup_key(renderer.template, renderer.special_tokens, renderer.tools, renderer.date)
    turns = None
    if not skeleton.seen_before(setup):
        renderer = replace(renderer, cached=False)
    else:
        turns = _outlined(tokenizer, renderer, setup, messages, selected, all_turns)
    if turns is None:
        turns = locate_turns(renderer, messages, selected, tokenize=_tail_tokenizer(tokenizer),
                             eos=tokenizer.eos_token, all_turns=all_turns)
    end_of_turn = "" if "" in turns.end_of_turn else turns.end_of_turn[-1]
    return _encode(tokenizer, turns.text, turns.spans, end_of_turn)


_OUTLINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {outline key: _Outline | None}
_MAX_OUTLINES = 4096


@dataclass(frozen=True)
class _Outline:
    """Where the trained turns are in every conversation of one outline: template text and cores, spans by piece."""

    pieces: list  # template text (str) and core numbers (int), as skeleton.stand_in_pieces gives them
    spans: list[tuple[tuple[int, int], tuple[int, int]]]  # (piece, offset in it) of each span's start and stop
    end_of_turn: list[str]

    def fill(self, cores: list[str]) -> tuple[str, list[tuple[int, int]]]:
        starts, texts, at = [], [], 0
        for piece in self.pieces:
            text = piece if isinstance(piece, str) else cores[piece]
            starts.append(at)
            texts.append(text)
            at += len(text)
        spans = [(starts[a] + i, starts[b] + j) for (a, i), (b, j) in self.spans]
        return "".join(texts), spans


def _outlined(tokenizer, renderer: Renderer, setup: tuple, messages, selected: list[int],
              all_turns: bool) -> Turns | None:
    """The turns of a conversation read off its outline's, where that is exact; None: locate them in this row.

    `locate_turns` renders a conversation ~6 times and compares end-of-turn texts token by token. Where the
    template never looks at a text (finetune.data.skeleton proves it per shape) and the end-of-turn texts it
    compares hold no text of a message, every step reads the texts only where they are written out, so the
    turns of a stand-in conversation (each text's core replaced by a marker, its outer whitespace kept) are
    those of every conversation with its outline once the cores are put back. Everything else is located row by
    row, as are rows whose text holds the characters reserved for marks (so the error names them).
    """
    key, cores, stand_in = skeleton.outline(messages)
    cache = _OUTLINES.setdefault(tokenizer, {})
    full_key = (setup, key, tuple(selected), all_turns)
    found = cache.get(full_key, False)
    if found is False:
        found = cache[full_key] = _outline(tokenizer, renderer, stand_in, selected, all_turns)
        if len(cache) > _MAX_OUTLINES:
            cache.pop(next(iter(cache)))
    if found is None:
        return None
    text, spans = found.fill(cores)
    if RESERVED.search(text):
        return None
    return Turns(text, spans, found.end_of_turn)


def _outline(tokenizer, renderer: Renderer, stand_in: list[dict], selected: list[int], all_turns: bool):
    tails = _tail_tokenizer(tokenizer)
    touched = []

    def tokenize(tail: str, chars: int):
        tokens = tails(tail, chars)
        if "\ufdd2" in tail[: tails.window(tail, chars)]:
            touched.append(tail)  # the comparison read a message's text: it may differ row by row
        return tokens

    rendered = skeleton.RENDERED[0]
    try:
        turns = locate_turns(renderer, stand_in, selected, tokenize=tokenize, eos=tokenizer.eos_token,
                             all_turns=all_turns)
    except UserError:
        return None  # located row by row, so the message quotes the row's own text
    if touched or skeleton.RENDERED[0] != rendered:
        return None
    pieces = skeleton.stand_in_pieces(turns.text)
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += len(piece) if isinstance(piece, str) else len(f"\ufdd2{piece}\ufdd3")

    def locate(offset: int) -> tuple[int, int] | None:
        index = bisect.bisect_right(starts, offset) - 1
        if isinstance(pieces[index], int) and offset != starts[index]:
            return None  # inside a text: where depends on the text
        return index, offset - starts[index]

    spans = [(locate(a), locate(b)) for a, b in turns.spans]
    if any(None in span for span in spans):
        return None
    return _Outline(pieces, spans, turns.end_of_turn)


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
_TOKEN_WINDOW = 64  # characters tokenised past the common part of two tails: longer than any special token


def _tail_tokenizer(tokenizer):
    """The tokens of an end-of-turn text's start, for the tails `locate_turns` compares token by token.

    A tail is tokenised up to 64 characters past the part it shares with another, or only up to the end of the
    first special token that ends past that part: the tokenizer splits its input at added tokens before anything
    else (a token without lstrip/rstrip/single_word/normalized ends a piece whatever follows), so the tokens up to
    there are those of the whole tail. Cut there, tails repeat from row to row (`<|im_end|>\n<|im_start|>`, where
    the 64 characters would reach into the next message) and are answered from a memory: a call into the tokenizer
    costs ~35 us however short the text (scripts/bench_data.py measures it).
    """
    cached = _TAILS.get(tokenizer)
    if cached is None:
        cached = _TAILS[tokenizer] = _TailTokenizer(tokenizer)
    return cached


class _TailTokenizer:
    def __init__(self, tokenizer) -> None:
        owner = weakref.ref(tokenizer)  # the memory must not keep its tokenizer alive
        self._tokenize = functools.lru_cache(maxsize=4096)(lambda text: _tokenize(owner(), text))
        added = [t for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if not t.normalized]
        self._hard = {t.content for t in added if not (t.lstrip or t.rstrip or t.single_word)}
        # Longest first: at each position Python's alternation then matches as the tokenizer's added-token split does
        contents = sorted({t.content for t in added if t.content}, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, contents))) if contents else None

    def __call__(self, tail: str, chars: int):
        return self._tokenize(tail[: self.window(tail, chars)])

    def window(self, tail: str, chars: int) -> int:
        """Where to stop tokenising `tail` so that the tokens up to character `chars` are the whole tail's."""
        end = min(len(tail), chars + _TOKEN_WINDOW)
        if self._added is not None:
            for match in self._added.finditer(tail, 0, end):
                if match.end() > chars:
                    if match.group() in self._hard:
                        end = match.end()
                    break
        return end


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
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop in spans:
        first = bisect.bisect_right(offsets, start, key=_stop)
        last = bisect.bisect_left(offsets, stop, key=_start)
        labels[first:last] = ids[first:last]
    return labels


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _stop(offset: tuple[int, int]) -> int:
    return offset[1]


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
