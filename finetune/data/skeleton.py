"""Render a chat template once per conversation shape, where that is provably the same as rendering every row.

Loss masks read each trained turn off ~6 renders of the conversation (see finetune.data.turns), and Jinja costs
~25 us a render: most of a row's encoding time besides the tokenizer. Most stock templates only *write* a
message's text (ChatML, Phi, Gemma, Mistral) or write it trimmed (Llama 2/3): they never look inside it. For
them the render of a conversation is a fixed interleaving of template text and message texts, decided by the
conversation's shape alone (roles, which fields are present, the values of every field but the texts).

So the template is rendered once per shape with each text replaced by a sentinel string that records every way
the template looks at it (`_Text`): writing it out (allowed), concatenating it (allowed: the result is tracked
too), stripping whitespace from it (allowed: the substitution strips the real text the same way), testing it for
truth (allowed: a text in a shape is never empty) and anything else (comparing, searching, slicing, measuring,
formatting, passing it to a filter or test that could read it, JSON-encoding it): then the shape is not cached
and every row of it is rendered as before. If nothing looked, the template's control flow cannot have depended
on the texts, so every conversation of that shape renders to the same interleaving with its own texts: the
cached render is the template's render, character for character (tests/test_skeleton.py checks it against
transformers' own render for every template of tests/templates and for templates that look in each way).
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping

_OPEN, _CLOSE = "\ufdd0", "\ufdd1"  # Unicode noncharacters: no template text contains them
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_STRIPS = ("strip", "lstrip", "rstrip")
# Filters that reach a text only through the operations _Text tracks (or return it unchanged); any other filter
# given a text (tojson and escape read it in C, where no method of ours is called) makes the shape uncached.
_SAFE_FILTERS = frozenset({"trim", "default", "d", "selectattr", "rejectattr", "select", "reject", "map", "attr",
                           "length", "count", "first", "last", "list", "reverse", "batch", "slice", "items"})
# Tests that read only the type of a value (a shape fixes every text's type).
_TYPE_TESTS = frozenset({"defined", "undefined", "none", "string", "mapping", "sequence", "iterable", "number",
                         "integer", "float", "boolean", "true", "false", "callable"})
_MAX_SHAPES = 4096  # per template set-up; conversation shapes in a dataset are few (roles x turns x fields)
_MAX_SETUPS = 16


class _Looked(Exception):
    """The template looked inside a message text: this shape's render depends on the texts."""


class _Probe:
    """What one skeleton render saw: the slots its sentinels stand for, and whether the template looked."""

    def __init__(self) -> None:
        self.slots: list[tuple[int, str, tuple]] = []  # (message index, field, strips applied)
        self.looked = False

    def text(self, message: int, key: str, strips: tuple = ()) -> _Text:
        self.slots.append((message, key, strips))
        return _Text(f"{_OPEN}{len(self.slots) - 1}{_CLOSE}")

    def look(self):
        self.looked = True
        raise _Looked


RENDERED = [0]  # renders that went through Jinja because the template looked at a text (see masks._outline)
_PROBE: list[_Probe] = []  # the probe of the render in progress (renders do not nest)


def _look(*_args, **_kwargs):
    _PROBE[-1].look()


class _Text(str):
    """A message text in a skeleton render: a sentinel that reports any look inside it."""

    __slots__ = ()

    def __getattribute__(self, name: str):
        if name in _STRIPS:
            return functools.partial(_strip, self, name)
        if name.startswith("__"):  # Python's own protocol lookups (the sandbox bars templates from "_" names)
            return str.__getattribute__(self, name)
        _look()

    def __add__(self, other):
        return _Text(str.__add__(self, other)) if isinstance(other, str) else NotImplemented

    def __radd__(self, other):
        return _Text(str.__add__(other, self)) if isinstance(other, str) else NotImplemented

    def __bool__(self) -> bool:
        return True  # a cached shape's texts have non-space characters, and a no-argument strip keeps them

    __str__ = __repr__ = __format__ = __len__ = __iter__ = __getitem__ = __contains__ = _look
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = _look
    __mul__ = __rmul__ = __mod__ = __rmod__ = _look


def _strip(text: _Text, how: str, chars=None) -> _Text:
    """`text.strip()` and kin on a whole sentinel: a new slot that strips the real text the same way."""
    match = _SENTINEL.fullmatch(str.__str__(text))
    if not match or not (chars is None or (isinstance(chars, str) and chars.isspace())):
        _look()  # a strip of a concatenation, or of characters a text may consist of
    message, key, strips = _PROBE[-1].slots[int(match.group(1))]
    return _PROBE[-1].text(message, key, (*strips, (how, chars)))


def _finalize(value):
    """Output of `{{ ... }}`: a text written out is what the skeleton is made of."""
    return str.__str__(value) if isinstance(value, _Text) else value


def _holds_text(value, depth: int = 0) -> bool:
    if isinstance(value, _Text):
        return True
    if depth > 8:
        return True  # deeper than any message: assume the worst
    if isinstance(value, Mapping):
        return any(_holds_text(k, depth + 1) or _holds_text(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_text(v, depth + 1) for v in value)
    return False


def _guarded(function: Callable, safe: bool) -> Callable:
    """A Jinja filter or test that reports a look when it is given a text it could read."""
    passes = getattr(function, "jinja_pass_arg", None)

    def guard(*args, **kwargs):
        values = args[1:] if passes is not None else args
        if not safe and (_holds_text(values) or _holds_text(kwargs)):
            _look()
        return function(*args, **kwargs)

    if passes is not None:
        guard.jinja_pass_arg = passes
    return guard


@functools.lru_cache(maxsize=32)
def _tracking_template(template: str):
    """The template as transformers compiles it, recompiled in a copy of its environment that tracks texts.

    None when the template has a chained comparison with `in`, which the guard below does not rewrite.
    """
    from jinja2 import nodes
    from jinja2.runtime import Macro
    from jinja2.visitor import NodeTransformer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    environment = _compile_jinja_template(template).environment.overlay(finalize=_finalize)
    environment.filters = {name: _guarded(f, name in _SAFE_FILTERS) for name, f in environment.filters.items()}
    environment.tests = {name: _guarded(f, name in _TYPE_TESTS) for name, f in environment.tests.items()}
    sandboxed_call = environment.call

    def call(context, function, *args, **kwargs):
        # A text given to any other callable (a method of a string constant, a global) is read where we cannot see.
        ours = function is _contains or (isinstance(function, functools.partial) and function.func is _strip)
        if not (ours or isinstance(function, Macro)) and (_holds_text(args) or _holds_text(kwargs)):
            _look()
        return sandboxed_call(context, function, *args, **kwargs)

    environment.call = call  # the sandbox routes every call in a template through environment.call

    class ContainsGuard(NodeTransformer):
        """`a in b` compiles to Python's `in`, where `text in "constant"` reads the text in C: call _contains."""

        chained = False

        def visit_Compare(self, node):
            self.generic_visit(node)
            if not any(op.op in ("in", "notin") for op in node.ops):
                return node
            if len(node.ops) != 1:
                self.chained = True
                return node
            negate = nodes.Const(node.ops[0].op == "notin")
            guard = nodes.Name("ft_contains_guard", "load")
            return nodes.Call(guard, [node.expr, node.ops[0].expr, negate], [], None, None, lineno=node.lineno)

    tree = environment.parse(template)
    rewriter = ContainsGuard()
    tree = rewriter.visit(tree)
    if rewriter.chained:
        return None
    return environment.from_string(tree, globals={"ft_contains_guard": _contains})


def _contains(item, container, negate: bool) -> bool:
    if isinstance(item, _Text) and isinstance(container, str) and not isinstance(container, _Text):
        _look()
    return (item not in container) if negate else (item in container)


def _is_text(key: str, value) -> bool:
    return key != "role" and isinstance(value, str) and bool(value.strip())


def _frozen(value):
    if isinstance(value, Mapping):
        return ("map", tuple((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return (type(value).__name__, value)


def shape(conversation: list[dict]) -> tuple:
    """Everything about a conversation a text-blind template can see: all but the texts (non-blank strings)."""
    out = []
    for message in conversation:
        fields = []
        for key, value in message.items():
            if type(value) is str:  # noqa: E721 (a subclass goes by value below)
                fields.append((key, None) if key != "role" and value.strip() else (key, "str", value))
            else:
                fields.append((key, _frozen(value)))
        out.append(tuple(fields))
    return tuple(out)


class Skeletons:
    """Cached renders of one template set-up (template, special tokens, tools, date), by conversation shape."""

    def __init__(self, template: str, variables: dict, alias: Callable, render_one: Callable[[list[dict], bool], str]):
        self._template = template
        self._variables = variables  # everything but messages and add_generation_prompt
        self._alias = alias  # transformers' copy of reasoning fields under the names templates read
        self.render_one = render_one  # the plain render (transformers' compiled template)
        self._shapes: OrderedDict = OrderedDict()

    def render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        pieces = self._pieces(conversation, add_generation_prompt)
        if pieces is None:  # the template looks at texts in this shape
            RENDERED[0] += 1
            return self.render_one(conversation, add_generation_prompt)
        return "".join(piece if isinstance(piece, str) else _fill(conversation, piece) for piece in pieces)

    def text_blind(self, conversation: list[dict], add_generation_prompt: bool) -> bool:
        """Whether conversations of this one's shape are filled into a cached render (the template never looks)."""
        return self._pieces(conversation, add_generation_prompt) is not None

    def _pieces(self, conversation: list[dict], add_generation_prompt: bool) -> list | None:
        key = (shape(conversation), add_generation_prompt)
        pieces = self._shapes.get(key, False)
        if pieces is False:
            pieces = self._skeleton(conversation, add_generation_prompt)
            self._shapes[key] = pieces
            if len(self._shapes) > _MAX_SHAPES:
                self._shapes.popitem(last=False)
        return pieces

    def _skeleton(self, conversation: list[dict], add_generation_prompt: bool) -> list | None:
        """The render as template text and slots, or None when the template looked at a text."""
        probe = _Probe()
        skeleton = [{key: probe.text(i, key) if _is_text(key, value) else value for key, value in message.items()}
                    for i, message in enumerate(conversation)]
        tracking = _tracking_template(self._template)
        if tracking is None:
            return None
        _PROBE.append(probe)
        try:
            text = tracking.render(
                messages=self._alias(skeleton), add_generation_prompt=add_generation_prompt, **self._variables
            )
        except Exception:  # _Looked, or the template refuses this shape: the plain render says why
            return None
        finally:
            _PROBE.pop()
        if probe.looked:
            return None
        pieces: list = []
        at = 0
        for match in _SENTINEL.finditer(text):
            pieces.append(text[at : match.start()])
            pieces.append(probe.slots[int(match.group(1))])
            at = match.end()
        pieces.append(text[at:])
        return [piece for piece in pieces if piece != ""]


def _fill(conversation: list[dict], slot: tuple) -> str:
    message, key, strips = slot
    text = conversation[message][key]
    for how, chars in strips:
        text = getattr(text, how)(chars)
    return text


_STAND_IN = re.compile("\ufdd2(\\d+)\ufdd3")  # a text's core in a stand-in conversation (see outline)


def outline(conversation: list[dict]) -> tuple[tuple, list[str], list[dict]]:
    """A conversation's shape with its texts' outer whitespace, the texts' cores, and a stand-in conversation.

    The stand-in has each text's core (the text without leading and trailing whitespace) replaced by a marker,
    so anything computed from it holds for every conversation with the same outline once the cores are put back
    (finetune.data.masks locates trained turns this way, once per outline, where that is exact).
    """
    key, cores, stand_in = [], [], []
    for message in conversation:
        fields, copy = [], {}
        for name, value in message.items():
            if type(value) is str and name != "role" and (core := value.strip()):  # noqa: E721
                lead, trail = value[: len(value) - len(value.lstrip())], value[len(value.rstrip()) :]
                fields.append((name, lead, trail))  # whitespace only: never "str" below
                copy[name] = f"{lead}\ufdd2{len(cores)}\ufdd3{trail}"
                cores.append(core)
            else:
                fields.append((name, "str", value) if type(value) is str else (name, _frozen(value)))  # noqa: E721
                copy[name] = value
        key.append(tuple(fields))
        stand_in.append(copy)
    return tuple(key), cores, stand_in


def stand_in_pieces(text: str) -> list:
    """A text rendered from a stand-in conversation, as template text and core numbers (ints)."""
    pieces: list = []
    at = 0
    for match in _STAND_IN.finditer(text):
        pieces += [text[at : match.start()], int(match.group(1))]
        at = match.end()
    pieces.append(text[at:])
    return pieces


def setup_key(template: str, special_tokens: dict, tools, date: str | None) -> tuple:
    """What a render takes besides the messages, as a dictionary key."""
    specials = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in special_tokens.items())
    return (template, specials, None if tools is None else _frozen(tools), date)


_SETUPS: OrderedDict = OrderedDict()
_SEEN: OrderedDict = OrderedDict()  # set-ups with tools met once


def seen_before(setup: tuple) -> bool:
    """Whether a set-up was met before; one without tools always was.

    Tool-calling datasets often give every row its own tools: caching those set-ups would cost a tracked render
    per row and serve nothing, so a set-up with tools is cached from its second row on.
    """
    if setup[2] is None or setup in _SETUPS:
        return True
    if setup in _SEEN:
        return True
    _SEEN[setup] = True
    if len(_SEEN) > _MAX_SHAPES:
        _SEEN.popitem(last=False)
    return False


def skeletons(template: str, special_tokens: dict, tools, date: str | None,
              make: Callable[[], Skeletons]) -> Skeletons:
    """The shape cache of a template set-up: everything a render takes besides the messages."""
    key = setup_key(template, special_tokens, tools, date)
    found = _SETUPS.get(key)
    if found is None:
        found = _SETUPS[key] = make()
        if len(_SETUPS) > _MAX_SETUPS:
            _SETUPS.popitem(last=False)
    return found
