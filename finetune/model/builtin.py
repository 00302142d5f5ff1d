"""The `builtin:` scheme: models built offline on first use, and the sample data shipped with the package.

`builtin:tiny-llama` and `builtin:tiny-qwen3` name random-initialised ~1M-parameter models (see
`finetune.model.tiny`), built and briefly pretrained once into the finetune cache, so tests,
quickstart and smoke runs work without a network. `builtin:<file>` names a sample data file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from finetune.errors import UserError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA_DIR = Path(__file__).resolve().parent.parent / "resources" / "data"
BUILTIN_MODELS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3"}
# Bump when the tokenizer, architecture or init changes, so stale cached builds are not reused.
BUILTIN_MODEL_VERSION = "v2"  # v2: pretrained on the sample facts as plain text
BUILTIN_PRETRAIN_STEPS = 200


def cache_dir() -> Path:
    """Root of finetune's cache: `$FINETUNE_CACHE`, else `~/.cache/finetune`."""
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def _builtin_name(spec: str, available: list[str], kind: str) -> str:
    """The name after `builtin:`; raises UserError if it is not one of `available`."""
    name = spec[len(BUILTIN_PREFIX) :]
    if name not in available:
        choices = ", ".join(BUILTIN_PREFIX + a for a in available)
        raise UserError(f"Unknown built-in {kind} {spec!r}. Available: {choices}")
    return name


def resolve_model_path(spec: str) -> str:
    """Turn `builtin:<name>` into the path of a locally built tiny model; other specs pass through.

    The model is built (and briefly pretrained, ~10 s) once into `<cache>/models/<name>-v2`. The build
    goes to a temporary sibling that is renamed into place, so an interrupted or concurrent build never
    leaves a partial model.
    """
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = _builtin_name(spec, sorted(BUILTIN_MODELS), "model")
    final = cache_dir() / "models" / f"{name}-{BUILTIN_MODEL_VERSION}"
    if final.is_dir():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    from finetune.logs import stderr

    stderr(f"building {spec} into {final} (first use only; ~10 s)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        from finetune.model.tiny import build_tiny_model

        build_tiny_model(tmp, arch=BUILTIN_MODELS[name], pretrain_steps=BUILTIN_PRETRAIN_STEPS)
        os.replace(tmp, final)
    except OSError:
        # Another process finished first (renaming onto a non-empty directory fails): use theirs.
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def builtin_data_files() -> list[str]:
    """Names of the sample data files shipped with the package."""
    return sorted(p.name for p in BUILTIN_DATA_DIR.iterdir() if p.suffix in (".jsonl", ".json", ".csv", ".txt"))


def resolve_data_path(spec: str) -> str:
    """Turn `builtin:<file>` into the absolute path of a shipped sample file; other specs pass through."""
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = _builtin_name(spec, builtin_data_files(), "data file")
    return str(BUILTIN_DATA_DIR / name)
