"""Content-addressed cache of prepared datasets: `$FINETUNE_CACHE/data/<key>/`.

The key hashes what the prepared rows depend on: the bytes of every data file (not their paths or
modification times), the tokenizer's files as `save_pretrained` writes them, the versions of the code that
tokenises and renders (tokenizers, transformers, finetune, and FORMAT_VERSION for our encoding), the chat
template and the date it prints (if it prints one), the data section, max_length, the seed and the method.
A change to any of them is a new key; nothing is ever invalidated in place. An entry is built in a
temporary sibling and renamed into place, so a crash or a concurrent writer never leaves a half-written
entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune import __version__

# Bump when encoding, masking or the stored layout changes, so old entries are not reused.
# 2: masks read off the template's renders (finetune.data.turns), tool calls, end_of_turn in the audit.
FORMAT_VERSION = 2
# Settings that do not change the prepared rows: changing them must not re-tokenise.
NOT_IN_KEY = {"num_proc", "min_trainable_fraction"}


def cache_root() -> Path:
    """Where prepared datasets live: `<FINETUNE_CACHE or ~/.cache/finetune>/data`."""
    from finetune.model.builtin import cache_dir

    return cache_dir() / "data"


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of the files `save_pretrained` writes (vocabulary, merges, special tokens, template)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="finetune-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + _tokenizer_file_bytes(path) + b"\0")
    return digest.hexdigest()


def _tokenizer_file_bytes(path: Path) -> bytes:
    # tokenizer.json also records the padding/truncation a previous call left switched on: runtime
    # state that changes once the tokenizer is used, not how it tokenises.
    if path.name != "tokenizer.json":
        return path.read_bytes()
    state = json.loads(path.read_text(encoding="utf-8"))
    state.pop("padding", None)
    state.pop("truncation", None)
    return json.dumps(state, sort_keys=True).encode()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that tokenise and render rows (a new release may split text differently)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("tokenizers", "transformers", "jinja2"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def cache_key(recipe, tokenizer, template: str | None, source_digests: dict[str, list[str]],
              date: str | None = None) -> str:
    """The key of a recipe's prepared data (see the module docstring for what goes in).

    `date` is the day a template that prints one shows (None when it prints none).
    """
    parts: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "finetune": __version__,
        "libraries": library_versions(),
        "template_date": date,
        "data": recipe.data.model_dump(mode="json", exclude=NOT_IN_KEY),
        "max_length": recipe.training.max_length,
        "seed": recipe.training.seed,
        "method": recipe.method.kind,
        "template": template,
        "tokenizer": tokenizer_digest(tokenizer),
        "sources": source_digests,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def entry_path(key: str) -> Path:
    """Where the entry of a key lives (whether or not it exists yet)."""
    return cache_root() / key


def load_entry(key: str):
    """(train, eval or None, audit records) of a complete entry, or None when there is none."""
    import datasets

    entry = entry_path(key)
    if not (entry / "audit.json").is_file():
        return None
    train = datasets.load_from_disk(str(entry / "train"))
    evaluation = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return train, evaluation, json.loads((entry / "audit.json").read_text(encoding="utf-8"))


def store_entry(key: str, train, evaluation, audit_records: list[dict], manifest: dict) -> Path:
    """Write an entry atomically; if another process stored the same key first, keep theirs."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        # audit.json last: load_entry treats its presence as "this entry is complete"
        (tmp / "audit.json").write_text(json.dumps(audit_records, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, final)
    except OSError:
        if not (final / "audit.json").is_file():  # not a lost race: a real failure (disk full, permissions)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
