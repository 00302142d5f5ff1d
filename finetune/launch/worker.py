"""One training process of a launched run: `python -m finetune.launch.worker RUN_DIR/recipe.yaml`.

`finetune train` starts these through `accelerate launch` after writing the resolved recipe. Every
worker reads that one file, with no overrides, so all processes train exactly the recipe the
launcher validated; nothing else reaches them on the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.errors import UserError
from finetune.launch.processes import is_local_main_process, is_main_process
from finetune.logs import stderr
from finetune.run.layout import RunDir


def run_worker(recipe_path: Path) -> Path:
    """Train the resolved recipe of a run as one of its processes."""
    from finetune.recipe import load_recipe
    from finetune.train.run import run_training

    loaded = load_recipe(recipe_path)
    run_dir = Path(loaded.recipe.run_dir)
    if not recipe_path.parent.resolve() == run_dir.resolve():
        raise UserError(
            f"{recipe_path}: this resolved recipe belongs to run directory {run_dir}, relative to where "
            "`finetune train` ran; start the workers from that directory (see launch.sh next to the recipe)"
        )
    return run_training(loaded, launched=True, log=stderr if is_main_process() else _silent)


def _silent(_: str) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m finetune.launch.worker RUN_DIR/recipe.yaml (started by `finetune train`)",
              file=sys.stderr)
        sys.exit(2)
    recipe_path = Path(args[0])
    try:
        run_worker(recipe_path)
    except UserError as exc:
        # Every process meets the same recipe and data, so one message per machine is enough; the
        # launcher repeats it after the launcher's own report of the failed processes.
        if is_local_main_process():
            print(f"error: {exc.render()}", file=sys.stderr, flush=True)
            RunDir(recipe_path.parent).launch_error.write_text(exc.render() + "\n", encoding="utf-8")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
