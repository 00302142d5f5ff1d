"""Optional lm-evaluation-harness tasks for `finetune eval --lm-eval`, run on the model already in memory."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import yaml

from finetune.errors import UserError


def check_lm_eval() -> None:
    """Fail before any model loads when the harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            "--lm-eval: the lm-evaluation-harness is not installed; install it with: "
            "pip install 'finetune-recipes[eval]' (its stock tasks download their datasets from the Hugging Face Hub)"
        )


def task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Task names, and the folders to search for tasks given as local YAML files."""
    names, folders = [], []
    for task in tasks:
        if task.endswith((".yaml", ".yml")):
            path = Path(task)
            if not path.is_file():
                raise UserError(f"--lm-eval: no such task file: {task}")
            names.append(yaml.safe_load(path.read_text(encoding="utf-8"))["task"])
            folders.append(str(path.resolve().parent))
        else:
            names.append(task)
    return names, sorted(set(folders))


def run_lm_eval(loaded, name: str, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, float]:
    """Run harness tasks on `loaded` with adapter `name` active (or the base); return flat {task/metric: value}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, folders = task_names(tasks)
    # Indexing the harness's own ~200 task folders takes tens of seconds: skip it when every task is a local file.
    named = any(not task.endswith((".yaml", ".yml")) for task in tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=named)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--lm-eval: unknown task(s) {', '.join(unknown)} (see `lm-eval ls tasks`)")
    # HFLM takes a transformers model: PEFT's LoRA layers live inside the base model it wraps, so
    # set_adapter / disable_adapter on the PeftModel still decide what the harness measures.
    model = loaded.model.get_base_model() if loaded.adapters else loaded.model
    harness = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=loaded.device)
    with loaded.use(name), _no_git_describe():
        try:
            output = simple_evaluate(model=harness, tasks=names, limit=limit, task_manager=manager, log_samples=False)
        except ConnectionError as exc:  # datasets' error when a task's dataset is neither cached nor reachable
            raise UserError(offline_message(tasks, exc)) from None
    metrics = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            measured = "stderr" not in key and not key.startswith("sample_len")
            if measured and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{key.split(',')[0]}"] = float(value)
    return metrics


@contextlib.contextmanager
def _no_git_describe():
    """lm-eval records `git describe` of the working directory in its results and lets git's stderr through, so
    every eval outside a git repository printed "fatal: not a git repository". We never read that hash: skip it.
    (Only that one call is replaced; every other message of the harness, and any error, still shows.)"""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # a harness that no longer asks git
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def offline_message(tasks: list[str], exc: BaseException) -> str:
    """One line for a harness task whose dataset the Hub cannot send (offline mode, or no network)."""
    from finetune.recipe.inputs import hub_offline

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    why = (
        "offline mode is on (HF_HUB_OFFLINE=1) and the dataset is not in the local cache"
        if hub_offline()
        else "the Hub cannot be reached"
    )
    return (
        f"--lm-eval {','.join(tasks)}: the task downloads its dataset from the Hugging Face Hub, and {why} ({first}). "
        "Run it once where there is a network (the dataset is then cached), or give a task YAML whose dataset is a "
        "local file"
    )
