"""Render a chat template as transformers' `apply_chat_template` does, with the date it shows pinned.

Some stock templates print today's date (Llama 3.2, Mistral Small 3.1, SmolLM3, Granite 3.3, gpt-oss call
`strftime_now`). Rendered with the clock, the same row would encode differently from one day to the next and a
cached dataset would silently hold another day's text. So every render here shows one fixed date: the recipe's
`data.template_date`, else the day the data is prepared; `renders_date` tells whether a template prints it at all
(then the date goes into the audit and the cache key).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import date as Date
from datetime import datetime

from finetune.data.skeleton import Skeletons, skeletons
from finetune.errors import UserError

_PROBE_TEXT = "\ue001"  # a private-use character: no template gives it a meaning
_NO_TOKENS = {"bos_token": "", "eos_token": ""}


@dataclass(frozen=True)
class Renderer:
    """A chat template with everything a render needs besides the messages.

    Attributes:
        template: The Jinja text.
        special_tokens: `bos_token`, `eos_token`, ... as apply_chat_template passes them.
        tools: The row's tool schemas (OpenAI style), passed to the template as `tools`.
        date: The day `strftime_now` reports (ISO YYYY-MM-DD); None: today.
        cached: Renders may come from the per-shape cache (finetune.data.skeleton); False: Jinja every time.
    """

    template: str
    special_tokens: dict = field(default_factory=dict)
    tools: list | None = None
    date: str | None = None
    cached: bool = True

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
        """Render each conversation; a template error is the user's (their template or data): UserError."""
        try:
            return render(self.template, conversations, self.special_tokens, tools=self.tools, date=self.date,
                          add_generation_prompt=add_generation_prompt, cached=self.cached)
        except UserError:
            raise
        except Exception as err:  # the template is user data: its failures are user errors
            raise UserError(f"The chat template failed on this conversation: {type(err).__name__}: {err}") from err


def render(template: str, conversations: list[list[dict]], special_tokens: dict, *, tools=None,
           date: str | None = None, add_generation_prompt: bool = False, cached: bool = True) -> list[str]:
    """Render conversations with transformers' own compiled template (same sandbox, filters and globals).

    transformers' `render_jinja_template` turns every keyword argument into plain data, so a pinned
    `strftime_now` cannot pass through it; we call the template it compiles with the same variables it passes
    (messages with reasoning aliased, tools, documents, add_generation_prompt, the special tokens) plus our clock.
    A conversation whose shape the template renders without looking at the texts is filled into that shape's
    cached render instead (finetune.data.skeleton: the same characters, without Jinja).
    """
    def make() -> Skeletons:
        compiled = _compile(template)
        alias = _reasoning_aliaser()
        variables = {"tools": tools, "documents": None, "strftime_now": _clock(date), **special_tokens}

        def render_one(conversation: list[dict], add_generation_prompt: bool) -> str:
            return compiled.render(messages=alias(conversation), add_generation_prompt=add_generation_prompt,
                                   **variables)

        return Skeletons(template, variables, alias, render_one)

    cache = skeletons(template, special_tokens, tools, date, make) if cached else make()
    render_one = cache.render if cached else cache.render_one
    return [render_one(conversation, add_generation_prompt) for conversation in conversations]


def _compile(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def _reasoning_aliaser():
    # transformers copies a message's reasoning under the names templates read (reasoning_content, thinking)
    from transformers.utils import chat_template_utils

    return getattr(chat_template_utils, "_alias_reasoning_fields", lambda chat: chat)


def _clock(date: str | None):
    moment = datetime.combine(Date.fromisoformat(date), datetime.min.time().replace(hour=12)) if date else None

    def strftime_now(fmt: str) -> str:
        return (moment or datetime.now()).strftime(fmt)

    return strftime_now


def today() -> str:
    """Today's date as data.template_date spells it."""
    return Date.today().isoformat()


@functools.lru_cache(maxsize=32)
def renders_date(template: str) -> bool:
    """Whether the template prints the date (rendered on two different days, a probe conversation differs)."""
    probes = [[{"role": "user", "content": _PROBE_TEXT}],
              [{"role": "system", "content": _PROBE_TEXT}, {"role": "user", "content": _PROBE_TEXT}]]
    for probe in probes:
        try:
            first = render(template, [probe], _NO_TOKENS, date="2001-02-03", add_generation_prompt=True)
            second = render(template, [probe], _NO_TOKENS, date="2002-11-12", add_generation_prompt=True)
        except Exception:  # a template may refuse a probe (no system role); the other probe still tells
            continue
        if first != second:
            return True
    return False
