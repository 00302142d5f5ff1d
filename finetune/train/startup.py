"""What a training process imports: the optional packages its recipe uses, and no others.

Installed but unused, four packages cost seconds before the first step, because the libraries import them
on their own: accelerate imports DeepSpeed (which imports MLflow) whenever it is installed, PEFT imports
bitsandbytes (which imports torch's inductor), TRL imports wandb. Measured with `python -X importtime` on
a 2-core machine: deepspeed with mlflow 1.2 s, bitsandbytes 1.05 s, wandb 0.4 s, of ~7 s to the first step.

`skip_unused_packages` hides each one this recipe does not need from the process (`sys.modules[name] = None`,
Python's own way to make `import name` raise ImportError and `importlib.util.find_spec` return None), so the
libraries take their "not installed" path. Only a process's entry point may call it (`finetune train`, a
launched worker): transformers and accelerate cache what they found, so the choice holds for the whole
process, and a later run in the same process could not get the package back.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe.schema import Recipe

# scipy: transformers imports scipy.optimize for its object-detection losses (0.23 s); bitsandbytes uses it
OPTIONAL_PACKAGES = ("deepspeed", "bitsandbytes", "wandb", "mlflow", "scipy")
_one_run = False  # set by skip_unused_packages: this process runs one recipe, then exits


def needed_packages(recipe: Recipe, base: str) -> set[str]:
    """The optional packages a run of `recipe` on the base weights at `base` imports on purpose."""
    needed = {name for name in ("wandb", "mlflow") if name in recipe.logging.report_to}
    if recipe.distributed.strategy == "deepspeed":
        needed |= {"deepspeed", "mlflow"}  # deepspeed imports mlflow unconditionally
    if recipe.adapter.kind == "qlora" or recipe.training.optimizer == "adamw_8bit" or _prequantised(base):
        needed |= {"bitsandbytes", "scipy"}  # bitsandbytes computes some quantisation maps with scipy
    return needed


def skip_unused_packages(recipe: Recipe) -> list[str]:
    """Hide the installed optional packages this run does not use; returns their names.

    Set FINETUNE_IMPORT_ALL=1 to keep every package visible (e.g. for a plugin that imports one itself).
    """
    from finetune.model.builtin import BUILTIN_PREFIX
    from finetune.model.start import resolve_start

    global _one_run
    _one_run = True
    cache_transformers_exports()
    if os.environ.get("FINETUNE_IMPORT_ALL") == "1":
        return []
    if recipe.model.path.startswith(BUILTIN_PREFIX):
        base = ""  # the built-in models are stored unquantised; resolving one would build it (torch) before the checks
    else:
        try:
            base = resolve_start(recipe).base
        except UserError:
            return []  # run_training reports it, after the checks that come first
    needed = needed_packages(recipe, base)
    hidden = []
    for name in OPTIONAL_PACKAGES:
        if name in needed or name in sys.modules or importlib.util.find_spec(name) is None:
            continue  # used, already imported (nothing to save), or not installed
        sys.modules[name] = None  # type: ignore[assignment]
        hidden.append(name)
    return hidden


def cache_transformers_exports() -> bool:
    """Keep transformers' table of what each model module exports on disk; returns whether it will be used.

    `import transformers` reads all ~3,300 files under transformers/models to learn what each exports
    (`define_import_structure`, twice: for the package and for transformers.models), 0.49 s of a 0.78 s import
    on a 2-core machine, on every start. The table depends only on the installed files, so it is kept in
    finetune's cache under a key naming the installation (its dist-info RECORD, rewritten by every install) and
    read back (0.3 s import). An editable install, whose files change without a reinstall, always scans, as does
    a process that imported transformers already. Must run before anything imports transformers.
    """
    if "transformers" in sys.modules:
        return False
    spec = importlib.util.find_spec("transformers")
    installed = _installation(Path(spec.origin).parent) if spec and spec.origin else None
    if installed is None:
        return False
    sys.meta_path.insert(0, _ExportsFinder(installed))
    return True


def _installation(package: Path) -> str | None:
    """What names this transformers installation: its dist-info and RECORD stamp; None for an editable one."""
    for info in package.parent.glob("transformers-*.dist-info"):
        record, direct = info / "RECORD", info / "direct_url.json"
        if not record.is_file() or (direct.is_file() and _editable(direct)):
            return None
        stat = record.stat()
        return f"{info.resolve()}:{stat.st_mtime_ns}:{stat.st_size}:{sys.version_info[:2]}"
    return None


def _editable(direct_url: Path) -> bool:
    try:
        return bool(json.loads(direct_url.read_text(encoding="utf-8")).get("dir_info", {}).get("editable"))
    except (OSError, ValueError, AttributeError):
        return True  # cannot tell: scan


class _ExportsFinder(importlib.abc.MetaPathFinder):
    """Wraps `define_import_structure` as transformers.utils.import_utils finishes loading (one use)."""

    def __init__(self, installed: str) -> None:
        self.installed = installed

    def find_spec(self, name, path, target=None):
        if name != "transformers.utils.import_utils":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            if callable(getattr(module, "define_import_structure", None)):
                module.define_import_structure = _cached_exports(module.define_import_structure, self.installed)

        spec.loader.exec_module = exec_module
        return spec


def _cached_exports(define, installed: str):
    import functools
    import hashlib
    import pickle
    import tempfile

    from finetune.model.builtin import cache_dir

    @functools.wraps(define)
    def cached(module_path, prefix=None):
        key = hashlib.sha256(repr((installed, str(module_path), prefix)).encode()).hexdigest()[:32]
        path = cache_dir() / "transformers-exports" / f"{key}.pickle"
        try:
            return pickle.loads(path.read_bytes())
        except Exception:  # not there yet, or unreadable: scan, as transformers does
            structure = define(module_path, prefix)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
                handle.write(pickle.dumps(structure))
            os.replace(handle.name, path)
        except OSError:
            pass  # a read-only cache only costs the scan
        return structure

    return cached


def freeze_startup_objects() -> None:
    """In a process that runs one recipe, move every object made so far out of the garbage collector's sight.

    The Trainer starts with a full `gc.collect()` (accelerate's free_memory), which walked every object that
    importing torch, transformers, PEFT and TRL leaves behind: 0.25 s before the first step (cProfile of a one-step
    run, docs/benchmarks.md), and every automatic full collection during training walks them again. They live as
    long as the process, so `gc.freeze()` loses nothing. Not in a process that runs several recipes (tests):
    garbage frozen there would never be freed.
    """
    if _one_run:
        import gc

        gc.freeze()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(device: str) -> bool:
    """In a CPU training process that runs one recipe, let glibc keep freed memory for reuse; returns whether it did.

    A training step frees and allocates the same activations again and again, most of them above glibc's
    threshold for serving a block by mmap (128 KiB, raised on the fly) or left at the top of the heap, where
    glibc hands them back to the system. The next step then pays a page fault per 4 KiB it touches: ~12,000 per
    packed step of the benchmark's workload, ~2% of its time. With blocks up to 32 MiB (glibc's most) taken from
    the heap, which grows 256 MiB at a time and is never trimmed, ~2,800 remain. Peak RSS stays the same (the
    memory is reused, not added); the process just keeps its peak until it exits. Not for a GPU run, whose
    host memory after data preparation would stay claimed for nothing, nor where libc is not glibc.
    """
    if not _one_run or device != "cpu" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another libc (musl): nothing to tune
        return False
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20)))


def _prequantised(base: str) -> bool:
    """Whether the base weights are stored quantised (their config.json has a quantization_config).

    A base we cannot read yet (a Hub id not in the local cache) counts as quantised: loading it may need
    bitsandbytes, and its download costs more than the import.
    """
    if not base:
        return False
    config = Path(base) / "config.json"
    if not config.is_file():
        config = _cached_hub_config(base)
    if config is None:
        return True
    try:
        return "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True


def _cached_hub_config(repo_id: str) -> Path | None:
    if Path(repo_id).exists():
        return None  # a local directory without config.json: transformers will say so
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repository id
        return None
    return Path(found) if isinstance(found, str) else None
