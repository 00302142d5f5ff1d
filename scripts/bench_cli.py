"""Time the CLI commands that must not import the ML stack (goal: under 0.5 s each).

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


def time_command(args: list[str], runs: int, cwd: str) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            args, cwd=cwd, capture_output=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        times.append(time.perf_counter() - start)
    return times


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


if __name__ == "__main__":
    main()
