"""Time the CLI commands that must not import the ML stack (goal: under 0.5 s each).

Also the refusals that need no model: `finetune train` into a directory that holds a run, and
`--resume` of a checkpoint whose recipe changed, must answer before torch and transformers load.

Usage: python scripts/bench_cli.py [--runs 7]   (results: median and best wall time per command)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def time_command(args: list[str], runs: int, cwd: str, code: int = 0) -> list[float]:
    """Wall times of `runs` runs of a command that must exit with `code`."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(args, cwd=cwd, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - start)
        assert done.returncode == code, (args, done.stderr.decode()[-2000:])
    return times


def refusal_fixtures(tmp: Path) -> tuple[Path, Path]:
    """A recipe whose run dir holds a run, and one whose checkpoint was written by another learning rate."""
    import yaml

    from finetune.recipe import load_recipe
    from finetune.redact import redact
    from finetune.run.checkpoints import commit_checkpoint
    from finetune.run.provenance import hash_data

    recipe = {"model": {"path": "builtin:tiny-llama"}, "data": {"train": [{"path": "builtin:sample_chat.jsonl"}]},
              "method": {"kind": "sft"}}
    held = tmp / "held.yaml"
    held.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(tmp / "runs/held")}}))
    (tmp / "runs/held").mkdir(parents=True)
    (tmp / "runs/held/recipe.yaml").write_text("name: earlier\n")
    changed = tmp / "changed.yaml"
    changed.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(tmp / "runs/changed")}}))
    resolved = load_recipe(changed).recipe
    earlier = redact(resolved.model_dump(mode="json"))
    earlier["training"]["learning_rate"] = 1.0
    checkpoint = tmp / "runs/changed/checkpoints/checkpoint-1"
    checkpoint.mkdir(parents=True)
    commit_checkpoint(checkpoint, step=1, epoch=0.1, samples=4, recipe_yaml=yaml.safe_dump(earlier),
                      data=hash_data(resolved))
    return held, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    recipe = str(REPO / "recipes/tiny/sft_lora.yaml")
    exe = [sys.executable, "-m", "finetune"]
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
            "finetune --help": exe + ["--help"],
            "finetune validate recipe": exe + ["validate", recipe],
            "finetune schema": exe + ["schema"],
        }
        print(f"| command | median s | best s |  ({args.runs} runs, {os.cpu_count()} CPUs)")
        print("|---|---|---|")
        for name, cmd in commands.items():
            times = time_command(cmd, args.runs, tmp)
            print(f"| `{name}` | {statistics.median(times):.3f} | {min(times):.3f} |")
        # The 7B recipe names its config directory relative to the repository root.
        plan = exe + ["plan", "recipes/7b/qlora.yaml", "--gpu-memory", "24GiB"]
        times = time_command(plan, args.runs, str(REPO))
        print(f"| `finetune plan recipes/7b/qlora.yaml --gpu-memory 24GiB` | {statistics.median(times):.3f} "
              f"| {min(times):.3f} |")
        times = []
        for i in range(args.runs):
            start = time.perf_counter()
            subprocess.run(exe + ["init", f"r{i}.yaml"], cwd=tmp, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        print(f"| `finetune init` | {statistics.median(times):.3f} | {min(times):.3f} |")
        held, changed = refusal_fixtures(Path(tmp))
        refusals = {
            "finetune train (run dir holds a run: refused)": exe + ["train", str(held)],
            "finetune train --resume (recipe changed: refused)": exe + ["train", str(changed), "--resume"],
        }
        for name, cmd in refusals.items():
            times = time_command(cmd, args.runs, tmp, code=2)
            print(f"| `{name}` | {statistics.median(times):.3f} | {min(times):.3f} |")


if __name__ == "__main__":
    main()
