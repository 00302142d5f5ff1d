"""Every check before training, in the order they run: each fails in seconds what would fail hours in.

Before the run directory is claimed (`check_before_claim`; nothing is written if one fails):
1. what `finetune validate` checks (recipe.inputs.check_inputs): data files and their first row, model.path's
   kind, builtin: names, template, output dir, installed extras, a run name that is not a secret; then
   the run directory can be claimed (and the checkpoint to resume fits the recipe); TRL's ORPO is installed;
2. local preference rows parse;
3. model.path: what it names (an earlier run, through its chain), with start_from's rules;
4. the weights are safetensors (a pickle can run code when loaded); GPU-only kernels (liger, flash-attention 2)
   have a CUDA GPU and their package;
5. adapter module names against the model's meta-device skeleton (no weights loaded);
6. the memory plan.

After the claim, before the first step: the data itself (bad rows, nothing to train; data.prepare),
the longest sample against max_length (`report_longest`), and disk room for the checkpoints
(`check_disk`, once the trainer knows the step count).
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe import LoadedRecipe
from finetune.recipe.methods import PREFERENCE_KINDS
from finetune.recipe.schema import Recipe

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
OPTIMIZER_STATES = {"adamw_torch": 2, "adamw_torch_fused": 2, "adamw_8bit": 2, "sgd": 0}  # tensors per parameter
SMALL_FILES = 2**20  # scheduler, RNG and trainer state, configs, model card: tens of KiB


def check_recipe_inputs(loaded: LoadedRecipe, lifecycle=None):
    """Checks 1-4 (see the module docstring); returns where training starts (model.start.Start).

    The launcher of a multi-process run runs these before it starts any process. `lifecycle` (a
    RunLifecycle) checks the run directory and the checkpoint to resume right after the inputs, before
    anything heavy is imported, so those refusals come in well under a second.
    """
    from finetune.model.start import resolve_start
    from finetune.recipe.inputs import check_inputs

    recipe = loaded.recipe
    check_inputs(loaded, launched=lifecycle is not None and lifecycle.launched)
    if lifecycle is not None:
        lifecycle.check()
    if recipe.method.kind in PREFERENCE_KINDS:
        from finetune.data.pairs import check_local_preference_data
        from finetune.train.preference import check_orpo_available

        check_orpo_available(recipe)
        check_local_preference_data(recipe)
    start = resolve_start(recipe)
    check_weights_format(start.base, recipe)
    check_kernels(recipe)
    return start


def check_before_claim(loaded: LoadedRecipe, *, ignore_memory_plan: bool, log, lifecycle=None):
    """Every check that needs no weights (1-6): returns (start, the model's layout for the adapter)."""
    recipe = loaded.recipe
    start = check_recipe_inputs(loaded, lifecycle)
    from finetune.adapters.targets import check_selection, read_layout
    from finetune.logs import quiet_libraries
    from finetune.model.load import resolve_precision
    from finetune.train.memory import check_memory

    quiet_libraries()
    layout = read_layout(start.base, recipe)
    check_selection(recipe, layout, recipe.model.path)
    check_memory(recipe, start.base, resolve_precision(recipe).device, force=ignore_memory_plan, log=log)
    return start, layout


def check_weights_format(model_path: str, recipe: Recipe) -> None:
    """Refuse a local model that has only pickle weights (loading a pickle can run arbitrary code)."""
    local = Path(model_path)
    if recipe.model.allow_pickle_weights or not local.is_dir():
        return  # Hub ids: transformers is told use_safetensors=True, and load_model explains its refusal
    names = [p.name for p in local.iterdir()]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise UserError(pickle_refusal(model_path, "only pickle files: " + ", ".join(pickles[:3])))


def pickle_refusal(model_path: str, found: str) -> str:
    """The message refusing a model without safetensors weights, naming the opt-in."""
    return (
        f"model.path: {model_path} has no safetensors weights ({found}); loading a pickle "
        "can run code hidden in it. Convert the weights to safetensors, or if you trust the source set "
        "model.allow_pickle_weights: true"
    )


def check_kernels(recipe: Recipe, device: str | None = None) -> None:
    """Refuse GPU-only kernels on a machine without a CUDA GPU, or without their package, before the model loads.

    `device` defaults to what model.load.resolve_precision picks (torch is imported only when a kernel is asked for).
    """
    wanted = []  # (what the recipe asks for, module, package, how to install it, what to do instead)
    if recipe.training.kernels == "liger":
        wanted.append(("training.kernels: 'liger'", "liger_kernel", "liger-kernel",
                       "pip install 'finetune-recipes[liger]'", "set training.kernels: none"))
    if recipe.model.attn_implementation == "flash_attention_2":
        wanted.append(("model.attn_implementation: flash_attention_2", "flash_attn", "flash-attn",
                       "a wheel built for your torch and CUDA (pip install flash-attn --no-build-isolation)",
                       "use sdpa (padding-free batches then run attention one sequence at a time)"))
    if wanted and device is None:
        from finetune.model.load import resolve_precision

        device = resolve_precision(recipe).device
    for what, module, package, install, instead in wanted:
        if device != "cuda":
            raise UserError(f"{what} runs on a CUDA GPU, and this machine has none; {instead}")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{what} needs the {package} package, which is not installed; install {install}, "
                            f"or {instead}")


@dataclass
class DiskPlan:
    """What a run will write: each checkpoint, how many exist at once, and the final output."""

    weights: int  # bytes of saved weights (adapter, or the whole model)
    optimizer: int  # bytes of optimizer state
    tokenizer: int
    checkpoints: int  # checkpoints on disk at the same time, at most

    @property
    def checkpoint(self) -> int:
        return self.weights + self.optimizer + self.tokenizer + SMALL_FILES

    @property
    def total(self) -> int:
        return self.checkpoints * self.checkpoint + self.weights + self.tokenizer


def plan_disk(recipe: Recipe, model, model_path: str, total_steps: int, steps_per_epoch: int) -> DiskPlan:
    """Estimate checkpoint sizes from the model's parameter counts and the recipe's save settings."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once, as safetensors saves them
    trainable = [p for p in params if p.requires_grad]
    saved = params if recipe.adapter.kind == "full" else trainable
    weights = sum(p.numel() * p.element_size() for p in saved)
    states = OPTIMIZER_STATES[recipe.training.optimizer]
    state_bytes = 1 if recipe.training.optimizer == "adamw_8bit" else None
    optimizer = sum(states * p.numel() * (state_bytes or p.element_size()) for p in trainable)
    local = Path(model_path)
    tokenizer = sum(
        p.stat().st_size for p in local.glob("*") if p.is_file() and ("token" in p.name or p.suffix == ".jinja")
    ) if local.is_dir() else 0
    return DiskPlan(weights, optimizer, tokenizer, checkpoints_at_once(recipe, total_steps, steps_per_epoch))


def checkpoints_at_once(recipe: Recipe, total_steps: int, steps_per_epoch: int) -> int:
    """The most checkpoints on disk at the same time: the kept ones, the one being written, the best one."""
    t = recipe.training
    saves = total_steps // t.save_steps if t.save_steps else 0
    if t.save_each_epoch:
        saves += total_steps // max(steps_per_epoch, 1)
    if not saves:
        return 1  # the checkpoint an interruption writes
    saves += 1  # the final step is saved too
    if t.save_total_limit is None:
        return saves
    return min(saves, t.save_total_limit + 1 + int(t.keep_best_checkpoint))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_disk(plan: DiskPlan, run_dir: Path, log, free: int | None = None) -> None:
    """Refuse to start when the run directory's disk cannot hold what the run will write."""
    free = shutil.disk_usage(run_dir).free if free is None else free
    summary = (
        f"{plan.checkpoints} checkpoint(s) of {human(plan.checkpoint)} (weights {human(plan.weights)}, optimizer "
        f"{human(plan.optimizer)}) + final output {human(plan.weights + plan.tokenizer)} = {human(plan.total)}"
    )
    if plan.total > free:
        raise UserError(
            f"output.dir: {run_dir} has {human(free)} free but this run writes up to {summary}. Free some space, "
            "keep fewer checkpoints (training.save_total_limit), or set output.dir on a bigger disk"
        )
    log(f"disk: up to {summary}; {human(free)} free")


def report_longest(audits, max_length: int, log) -> None:
    """Log the longest sample against max_length, and how many rows max_length cuts."""
    measured = [(a.length_max, a.name) for a in audits if a.length_max]
    if not measured:
        return
    longest, where = max(measured)
    truncated = sum(a.truncated for a in audits)
    line = f"longest sample: {longest} tokens ({where}) vs training.max_length {max_length}"
    if truncated:
        line += f": {truncated} row(s) are cut to {max_length} tokens (raise training.max_length to keep them whole)"
    log(("warning: " if truncated else "") + line)
