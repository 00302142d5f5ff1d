"""What a recipe points at, checked in a second without loading a model or touching the network.

`check_inputs` runs in `finetune validate` and at the start of `finetune train` (before the run
directory is claimed), so both refuse the same mistakes: a missing or unreadable data file, a first
row that does not fit its format, a model path that is a file or not a model folder, an unknown
`builtin:` name, a missing chat template file, an output directory that is a file, a missing tracker
or quantisation package. Nothing here imports torch, transformers or datasets.

Network: never used. A Hub id is reported as "not checked"; with offline mode on (HF_HUB_OFFLINE=1)
it must already be in the local Hub cache, or it is refused with how to use a local copy instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe.load import KeyPath, LoadedRecipe, _origin, did_you_mean, dotted_path
from finetune.recipe.schema import DatasetSpec, Recipe

MAX_FILES_READ = 20  # first rows read per dataset; every file is still checked for existence
MAX_JSON_BYTES = 256 << 20  # a .json file is parsed whole to reach its first row; bigger ones are not parsed here
PARQUET_MAGIC = b"PAR1"


class _Findings:
    """Problems (refused) and notes (printed by validate) about one recipe, each at its key's origin."""

    def __init__(self, origins: dict[KeyPath, str]):
        self.origins = origins
        self.problems: list[str] = []
        self.notes: list[str] = []

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(f"{_origin(self.origins, path)}: {dotted_path(path)}: {message}")

    def note(self, path: KeyPath, message: str) -> None:
        self.notes.append(f"{dotted_path(path)}: {message}")

    def guard(self, path: KeyPath, check: Callable[[], Any]) -> None:
        """Run a check that raises UserError with its own key path; record its message at `path`'s origin."""
        try:
            check()
        except UserError as exc:
            self.problems.append(f"{_origin(self.origins, path)}: {exc.render()}")


def check_inputs(loaded: LoadedRecipe, *, launched: bool = False) -> list[str]:
    """Raise UserError listing every problem with what the recipe points at; return notes for validate.

    `launched`: checked by a worker of a launched run, which reads the run's resolved recipe.yaml that the
    launcher wrote (and checked the run directory for) before the main process writes provenance.json."""
    recipe = loaded.recipe
    found = _Findings(loaded.origins)
    _check_model(recipe, found)
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split)):
            _check_dataset(recipe, spec, ("data", split, i), found)
    _check_template(recipe.data.chat_template, found)
    _check_output(Path(recipe.run_dir), found, launched)
    _check_environment(recipe, found)
    if found.problems:
        n = len(found.problems)
        raise UserError(
            f"{loaded.source}: {n} problem{'s' if n > 1 else ''} with what the recipe points at; nothing was written",
            problems=found.problems,
        )
    return found.notes


# --- names and the Hub ----------------------------------------------------------------------------


def _check_builtin(path: KeyPath, spec: str, names: list[str], kind: str, found: _Findings) -> bool:
    """Whether `builtin:NAME` names a known built-in; records the problem with a did-you-mean if not."""
    from finetune.model.builtin import BUILTIN_PREFIX

    name = spec[len(BUILTIN_PREFIX) :]
    if name in names:
        return True
    choices = [BUILTIN_PREFIX + n for n in names]
    found.problem(path, f"unknown built-in {kind} {spec!r}{did_you_mean(spec, choices)}; the built-in {kind}s are "
                  f"{', '.join(choices)}")
    return False


def hub_offline() -> bool:
    """Whether huggingface_hub's offline mode is on (it reads HF_HUB_OFFLINE the same way)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The Hub cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub)."""
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(os.environ.get("HF_HUB_CACHE") or Path(home) / "hub").expanduser()


def hub_offline_message(repo_id: str, key: str, kind: str = "model") -> str:
    """Why a Hub id cannot load in offline mode, and how to use a local copy instead."""
    get = "huggingface-cli download" + (" --repo-type dataset" if kind == "dataset" else "")
    return (
        f"{key}: no local directory {repo_id}, and as a Hub id it can only come from the local Hub cache "
        f"({hub_cache()}) because offline mode is on (HF_HUB_OFFLINE=1); the cache does not hold it. If it is a "
        "local path, fix it; if it is a Hub id, download it where there is a network "
        f"(`{get} {repo_id} --local-dir DIR`), copy DIR here and give that directory as {key}; or unset HF_HUB_OFFLINE"
    )


def refuse_offline_hub(repo_id: str, key: str) -> None:
    """Raise the offline-mode message for a Hub model id that offline mode cannot reach (not in the cache).

    A local path (one that exists) or a builtin: name is never a Hub id: nothing happens then.
    """
    if repo_id.startswith("builtin:") or Path(repo_id).expanduser().exists():
        return
    if hub_offline() and not (hub_cache() / f"models--{repo_id.replace('/', '--')}").is_dir():
        raise UserError(hub_offline_message(repo_id, key))


def _check_hub(path: KeyPath, repo_id: str, kind: str, found: _Findings) -> None:
    offline = hub_offline() or (kind == "dataset" and os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "ON", "TRUE"))
    cached = (hub_cache() / f"{kind}s--{repo_id.replace('/', '--')}").is_dir()
    if offline and not cached and not (kind == "dataset" and _datasets_cached(repo_id)):
        message = hub_offline_message(repo_id, dotted_path(path), kind)
        found.problems.append(f"{_origin(found.origins, path)}: {message}")
    else:
        found.note(path, f"{repo_id}: Hub id, not checked (validate does not use the network)")


def _datasets_cached(repo_id: str) -> bool:
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    root = Path(os.environ.get("HF_DATASETS_CACHE") or Path(home) / "datasets").expanduser()
    return (root / repo_id.replace("/", "___")).is_dir()


# --- model ----------------------------------------------------------------------------------------


def _check_model(recipe: Recipe, found: _Findings) -> None:
    """model.path: what it names (finetune.run.resolve.locate reads only marker files), and what that needs.

    An earlier run, an adapter or a start_from setting goes through train's own resolve_start, unless
    that would provision a built-in model first (a download or build: train does it).
    """
    from finetune.model.builtin import BUILTIN_MODELS
    from finetune.model.start import resolve_start
    from finetune.run.resolve import locate

    key = ("model", "path")
    spec = recipe.model.path
    try:
        kind = "start" if recipe.model.start_from != "auto" else locate(spec).kind
    except UserError as exc:  # a missing local path (with a did-you-mean), a file, a folder that holds no model
        found.problem(key, exc.render())
        return
    if kind == "builtin":
        _check_builtin(key, spec, sorted(BUILTIN_MODELS), "model", found)
    elif kind == "hub":
        _check_hub(key, spec, "model", found)
    elif kind != "model":
        unprovisioned = _unprovisioned_base(spec)
        if unprovisioned:
            found.note(key, f"an earlier run on {unprovisioned}, which is provisioned on first use; `finetune train` "
                       "checks the run's outputs after that")
        else:
            found.guard(key, lambda: resolve_start(recipe))  # train's own checks and messages


def _unprovisioned_base(spec: str) -> str | None:
    """The builtin: base at the root of a chain of earlier runs, if it is not provisioned yet."""
    from finetune.model.builtin import BUILTIN_MODELS, BUILTIN_PREFIX, cache_state
    from finetune.run.layout import RunDir

    for _ in range(16):
        if spec.startswith(BUILTIN_PREFIX):
            model = BUILTIN_MODELS.get(spec[len(BUILTIN_PREFIX) :])
            return spec if model is not None and cache_state(model)[0] != "cached" else None
        run = RunDir.at(Path(spec).expanduser())
        if not run.exists():
            return None
        try:
            spec = run.read_recipe().model.path
        except UserError:
            return None  # resolve_start says what is wrong with it
    return None


# --- data -----------------------------------------------------------------------------------------


def _check_dataset(recipe: Recipe, spec: DatasetSpec, key: KeyPath, found: _Findings) -> None:
    from finetune.data.sources import local_files
    from finetune.model.builtin import BUILTIN_PREFIX, builtin_data_files

    path_key = key + ("path",)
    if spec.path.startswith(BUILTIN_PREFIX) and not _check_builtin(
        path_key, spec.path, builtin_data_files(), "data file", found
    ):
        return
    try:
        files = local_files(spec, dotted_path(key))
    except UserError as exc:
        found.problems.append(f"{_origin(found.origins, path_key)}: {exc.render()}")
        return
    if files is None:
        _check_hub(path_key, spec.path, "dataset", found)
        return
    for file in files:
        if not os.access(file, os.R_OK):
            found.problem(path_key, f"{file}: cannot be read (permission denied)")
    for file in files[:MAX_FILES_READ]:
        _check_first_row(recipe, spec, path_key, file, found)


def _check_first_row(recipe: Recipe, spec: DatasetSpec, path_key: KeyPath, file: Path, found: _Findings) -> None:
    """The file's first row reads and fits the format (the rest is read by train and `data preview`)."""
    from finetune.data.formats import BadRow, to_canonical
    from finetune.data.sources import first_row

    label = spec.path if spec.path.startswith("builtin:") else str(file)
    if file.suffix == ".parquet":
        with file.open("rb") as handle:
            head = handle.read(4)
            handle.seek(max(file.stat().st_size - 4, 0))
            tail = handle.read(4)
        if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
            found.problem(path_key, f"{label}: not a Parquet file (it lacks the PAR1 marker); is the suffix right?")
        return
    if file.suffix == ".json" and file.stat().st_size > MAX_JSON_BYTES:
        found.note(path_key, f"{label}: a large .json file, read by train only (JSONL reads faster)")
        return
    try:
        where, value = first_row(file, spec, label)
    except UserError as exc:
        found.problem(path_key, exc.render())
        return
    except BadRow as bad:  # the first row could not be read at all
        _bad_first_row(recipe, path_key, bad.where, bad.detail, found)
        return
    if where is None:
        _bad_first_row(recipe, path_key, label, "the file has no rows", found)
        return
    if spec.format in ("preference", "unpaired_preference"):
        from finetune.data.pairs import check_preference_row

        shape = "each row must be a JSON object"
        detail = check_preference_row(value, spec.format) if isinstance(value, dict) else shape
    else:
        try:
            to_canonical(value, spec)
            detail = None
        except BadRow as bad:
            detail = bad.detail
    if detail:
        _bad_first_row(recipe, path_key, where, detail, found)


def _bad_first_row(recipe: Recipe, path_key: KeyPath, where: str, detail: str, found: _Findings) -> None:
    if recipe.data.on_bad_row == "skip":
        found.note(path_key, f"{where}: {detail} (skipped: data.on_bad_row is skip)")
    else:
        found.problem(path_key, f"{where}: {detail}")


# --- template, output, environment ----------------------------------------------------------------


def _check_template(template: str | None, found: _Findings) -> None:
    from finetune.data.templates import BUILTIN_TEMPLATES

    key = ("data", "chat_template")
    if template is None or template in BUILTIN_TEMPLATES:
        return
    names = list(BUILTIN_TEMPLATES)
    if template.endswith(".jinja"):
        if not Path(template).expanduser().is_file():
            found.problem(key, f"no such file: {template} (relative paths are relative to {Path.cwd()}); or use a "
                          f"built-in template: {', '.join(names)}")
    else:
        found.problem(key, f"unknown template {template!r}{did_you_mean(template, names)}; use a built-in name "
                      f"({', '.join(names)}) or the path of a .jinja file")


def _check_output(run_dir: Path, found: _Findings, launched: bool) -> None:
    from finetune.run.layout import RunDir
    from finetune.run.lock import foreign_recipe

    key = ("output", "dir")
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                inside = "" if path == run_dir else f"{run_dir} would be inside {path}, which "
                found.problem(key, f"{inside or str(run_dir) + ' '}is a file, not a directory; choose another "
                              "output.dir (e.g. --set output.dir=runs/NAME)")
            elif path == run_dir and not launched and (foreign := foreign_recipe(RunDir(run_dir))) is not None:
                found.problem(key, foreign)
            return


def _check_environment(recipe: Recipe, found: _Findings) -> None:
    """Packages and settings train needs before anything loads (each check raises its own message)."""
    from finetune.model.load import check_quantisation_available
    from finetune.redact import secret_key_paths
    from finetune.train.trackers import check_trackers

    found.guard(("adapter", "kind"), lambda: check_quantisation_available(recipe))
    found.guard(("logging", "report_to"), lambda: check_trackers(recipe))
    if secret_key_paths(recipe.name):
        found.problem(("name",), "looks like a secret (a token or key); it names the run directory, so it cannot be "
                      "redacted. Choose another name")
    config = recipe.distributed.config
    if config is not None:
        from finetune.launch.configs import named_configs

        names = sorted(named_configs())
        if config not in names and not Path(config).expanduser().is_file():
            found.problem(("distributed", "config"), f"no shipped config named {config!r}{did_you_mean(config, names)} "
                          f"and no such file; shipped: {', '.join(names)}")
