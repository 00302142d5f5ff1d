"""A conversation filled into its shape's cached render is the template's own render, character for character.

finetune.data.skeleton renders a template once per conversation shape and fills each row's texts in, where the
template provably never looked inside a text. Held here against transformers' compiled template rendering
every conversation itself: every stock template of tests/templates on conversations whose texts differ
(whitespace, `</think>`, `<tool_response>`, quotes), and templates that look inside a text in every way a Jinja
template can, each with two texts that send it down different branches. A guard that missed a way of looking
would serve the first text's branch for the second and fail here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from finetune.data import skeleton
from finetune.data.render import render

TEMPLATES = Path(__file__).parent / "templates"
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def direct(template: str, conversation: list[dict], prompt: bool, tools=None) -> str:
    """The template rendering this conversation itself, as finetune.data.render did before any cache."""
    from transformers.utils.chat_template_utils import _alias_reasoning_fields, _compile_jinja_template

    from finetune.data.render import _clock

    return _compile_jinja_template(template).render(
        messages=_alias_reasoning_fields(conversation), tools=tools, documents=None, add_generation_prompt=prompt,
        strftime_now=_clock("2026-01-02"), **SPECIAL)


def ours(template: str, conversation: list[dict], prompt: bool, tools=None) -> str:
    return render(template, [conversation], SPECIAL, tools=tools, date="2026-01-02", add_generation_prompt=prompt)[0]


def with_texts(conversation: list[dict], texts: list[str]) -> list[dict]:
    """The conversation with each message's content replaced, in order (same shape: texts stay non-blank)."""
    out = copy.deepcopy(conversation)
    for message, text in zip((m for m in out if (m.get("content") or "").strip()), texts, strict=False):
        message["content"] = text
    return out


TEXTS = [
    ["You are terse.", "What is the capital of France?", "Paris.", "And Germany?", "Berlin."],
    ["  Spaced system \n", "\nLeading newline", "<think>\nhmm\n</think>\n\nParis.  ", "<tool_response>\nx\n"
     "</tool_response>", ' Quote " and \\ backslash\n'],
    ["S", "q", "a", "q2", "a2"],
]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    "system": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
               {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
               {"role": "assistant", "content": "a2"}],
    "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
              {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
}


@pytest.mark.parametrize("name", sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
def test_every_stock_template_renders_as_itself_through_the_cache(name):
    template = (TEMPLATES / f"{name}.jinja").read_text()
    for conversation in CONVERSATIONS.values():
        for cut in range(1, len(conversation) + 1):
            for prompt in (False, True):
                for texts in TEXTS + TEXTS[::-1]:  # each text set once with the shape cached by another
                    messages = with_texts(conversation[:cut], texts)
                    try:
                        expected = direct(template, messages, prompt)
                    except Exception as err:  # the template refuses the conversation: so must the cached path
                        with pytest.raises(type(err)) as raised:
                            ours(template, messages, prompt)
                        assert str(raised.value) == str(err)
                        continue
                    assert ours(template, messages, prompt) == expected, (name, cut, prompt, texts)


def test_text_blind_templates_are_served_from_the_cache_and_lookers_are_not():
    """The speed-up is real for ChatML and Llama 3 (which trims), and Qwen3 (which splits on </think>) is rendered."""
    conversation = CONVERSATIONS["system"]
    for name, blind in (("smollm2", True), ("llama-3.1", True), ("phi-4", True), ("qwen3", False),
                        ("seed-oss", False)):
        template = (TEMPLATES / f"{name}.jinja").read_text()
        ours(template, conversation, False)
        cache = skeleton.skeletons(template, SPECIAL, None, "2026-01-02", lambda: None)
        assert cache.text_blind(conversation, False) is blind, name


LOOKS = {
    "method": "{% if m.content.startswith('x') %}X{% endif %}",
    "equal": "{% if m.content == 'x' %}X{% endif %}",
    "equal reversed": "{% if 'x' == m.content %}X{% endif %}",
    "contains": "{% if 'x' in m.content %}X{% endif %}",
    "in a string": "{% if m.content in 'xyz' %}X{% endif %}",
    "not in a string": "{% if m.content not in 'xyz' %}X{% endif %}",
    "in a list": "{% if m.content in ['x', 'y'] %}X{% endif %}",
    "length": "{% if m.content|length > 3 %}X{% endif %}",
    "tojson": "{{ m.content|tojson }}",
    "upper": "{{ m.content|upper }}",
    "index": "{{ m.content[0] }}",
    "slice": "{{ m.content[1:] }}",
    "loop": "{% for c in m.content %}{{ c }}-{% endfor %}",
    "percent": "{{ '%s!' % m.content }}",
    "tilde then method": "{% set t = m.content ~ '' %}{% if t.endswith('x') %}X{% endif %}",
    "join method": "{% if ' '.join([m.content]).startswith('x') %}X{% endif %}",
    "join filter": "{% if ([m.content]|join(',')).startswith('x') %}X{% endif %}",
    "map join": "{% if (messages|map(attribute='content')|join(' ')).endswith('x') %}X{% endif %}",
    "strip then equal": "{% if m.content.strip() == 'x' %}X{% endif %}",
    "strip characters": "{{ m.content.strip('x') }}",
    "lstrip characters truth": "{% if m.content.lstrip('x') %}X{% endif %}",
    "split": "{{ m.content.split('b')[-1] }}",
    "namespace": "{% set ns = namespace(c=m.content) %}{% if ns.c == 'x' %}X{% endif %}",
    "replace filter": "{{ m.content|replace('A', 'B') }}",
    "dict key": "{% set d = {m.content: 1} %}{{ d['x'] }}",
    "lower equal": "{% if m.content|lower == 'x' %}X{% endif %}",
    "in test": "{% if m.content is in ['x'] %}X{% endif %}",
    "format method": "{{ '{}!'.format(m.content) }}",
    "concatenation then method": "{% if ('<' + m.content).endswith('x') %}X{% endif %}",
    "string filter then method": "{% if (m.content|string).startswith('x') %}X{% endif %}",
    "wordcount": "{{ m.content|wordcount }}",
    "raise": "{% if m.content == 'never' %}{{ raise_exception(m.content) }}{% endif %}",
}


@pytest.mark.parametrize("how", sorted(LOOKS))
def test_a_template_that_looks_inside_a_text_is_rendered_for_every_row(how):
    template = "{% for m in messages %}[" + LOOKS[how] + "|{{ m.content }}]{% endfor %}"
    first, second = ([{"role": "user", "content": text}] for text in ("x", 'Ab"c'))
    for a, b in ((first, second), (second, first)):
        skeleton._SETUPS.clear()
        assert ours(template, a, False) == direct(template, a, False)
        assert ours(template, b, False) == direct(template, b, False), how


def test_writing_concatenating_and_trimming_texts_is_filled_in():
    template = ("{% for m in messages %}{% if m.content %}<{{ m.role }}>{{ m.content|trim }}"
                "|{{ '(' + m.content + ')' }}|{{ m.content.lstrip('\\n') }}{% endif %}{% endfor %}")
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ours(template, conversation, False)
    cache = skeleton.skeletons(template, SPECIAL, None, "2026-01-02", lambda: None)
    assert cache.text_blind(conversation, False)
    for texts in (["  spaced  ", "\n\nnew lines\n"], ["x", 'Ab"c']):
        messages = with_texts(conversation, texts)
        assert ours(template, messages, False) == direct(template, messages, False)


def test_the_shape_holds_everything_but_the_texts():
    """Two conversations differing in anything but a non-blank text (a role, a blank text, a field) never share."""
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert skeleton.shape(base) == skeleton.shape(with_texts(base, ["other", "texts"]))
    variants = [
        [{"role": "system", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q", "name": ""}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": []}],
        [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}],
        [{"content": "q", "role": "user"}, {"role": "assistant", "content": "a"}],  # key order is visible too
    ]
    shapes = {skeleton.shape(v) for v in variants}
    assert len(shapes) == len(variants) and skeleton.shape(base) not in shapes


def test_tools_and_date_are_part_of_the_set_up():
    template = "{{ strftime_now('%Y') }}{% if tools %}{{ tools|tojson }}{% endif %}{{ messages[0].content }}"
    messages = [{"role": "user", "content": "q"}]
    for tools, date in ((None, "2001-01-01"), ([{"name": "f"}], "2001-01-01"), (None, "2002-01-01")):
        got = render(template, [messages], SPECIAL, tools=tools, date=date)[0]
        assert got == date[:4] + ("" if tools is None else '[{"name": "f"}]') + "q"


def test_a_row_read_off_its_outline_is_the_row_located_by_itself(monkeypatch):
    """Per stock template: a conversation encoded after another of the same outline (the cached path) gets the
    ids and labels that locating its own turns gives (the per-row path), or the same refusal."""
    from test_template_corpus import CONVERSATIONS as CORPUS
    from test_template_corpus import NAMES, tokenizer_for

    from finetune.data import masks

    def encode(name, messages, tools, train_on, outlines: bool):
        if not outlines:
            monkeypatch.setattr(masks, "_outlined", lambda *args: None)
        try:
            encoded = masks.encode_messages(tokenizer_for(name), messages, train_on=train_on, tools=tools,
                                            chat_template=(TEMPLATES / f"{name}.jinja").read_text(),
                                            date="2026-01-02")
            return encoded.input_ids, encoded.labels, encoded.end_of_turn
        except Exception as err:
            return type(err).__name__, str(err)
        finally:
            monkeypatch.undo()

    replaced = 0
    for name in NAMES:
        for messages, tools in CORPUS.values():
            texts = [m["content"] for m in messages if (m.get("content") or "").strip()]
            other = with_texts(messages, [f"{t[:len(t) - len(t.lstrip())]}Other {i} \"quoted\" it."
                                          f"{t[len(t.rstrip()):]}" for i, t in enumerate(texts)])
            for train_on in ("all_assistant", "last_assistant"):
                masks._OUTLINES.clear()
                encode(name, messages, tools, train_on, outlines=True)  # caches the outline
                cached = encode(name, other, tools, train_on, outlines=True)
                assert cached == encode(name, other, tools, train_on, outlines=False), (name, train_on)
                replaced += isinstance(cached[0], list) and cached[0] != encode(name, messages, tools, train_on,
                                                                                 outlines=False)[0]
    assert replaced > 50  # the texts did change the encoding: the comparison is not of one row with itself


def test_an_end_of_turn_that_merges_with_the_next_text_is_located_row_by_row():
    """A template writing "." after each message, with a tokenizer that merges ".P" (not ".Z"): whether "." ends
    the reply as a token of its own depends on the next message's first letter, so no outline may be reused."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from finetune.data import masks

    backend = Tokenizer(models.BPE())  # no pre-tokenizer: merges run across the "." and the next text
    backend.train_from_iterator(["Hi.Pa.Pa.Pa.Yo", "ZedZoo", "HiYoPaZedZoo"] * 50,
                                trainers.BpeTrainer(vocab_size=40, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer.tokenize(".Pa")[0].startswith(".P") and tokenizer.tokenize(".Zoo")[0] == "."
    template = "{% for m in messages %}{{ m.content }}.{% endfor %}"

    def trained(user: str) -> str:
        messages = [{"role": "user", "content": "Zed"}, {"role": "assistant", "content": "Hi"},
                    {"role": "user", "content": user}, {"role": "assistant", "content": "do"}]
        encoded = masks.encode_messages(tokenizer, messages, chat_template=template, date="2026-01-02")
        return "".join(tokenizer.convert_ids_to_tokens([t for t in encoded.labels if t != masks.IGNORE_INDEX]))

    masks._OUTLINES.clear()
    assert trained("Zoo") == "Hi.do."  # "." is a token of its own after the first reply: trained with it
    assert trained("Pa") == "Hido."  # ".P" belongs to the user's text: the first reply is trained without "."


def test_tools_met_once_are_not_cached_and_tools_met_again_are():
    """Datasets that give every row its own tools would only fill the cache: a set-up with tools caches from its
    second row on, and encodes the same either way."""
    from test_template_corpus import CONVERSATIONS as CORPUS
    from test_template_corpus import tokenizer_for

    from finetune.data import masks

    messages, tools = CORPUS["tools"]
    template = (TEMPLATES / "qwen2.5.jinja").read_text()
    tokenizer = tokenizer_for("qwen2.5")
    skeleton._SETUPS.clear()
    skeleton._SEEN.clear()
    first = masks.encode_messages(tokenizer, messages, chat_template=template, tools=tools, date="2026-01-02")
    assert not skeleton._SETUPS  # rendered by Jinja, nothing cached
    second = masks.encode_messages(tokenizer, messages, chat_template=template, tools=tools, date="2026-01-02")
    assert len(skeleton._SETUPS) == 1
    assert (first.input_ids, first.labels) == (second.input_ids, second.labels)
