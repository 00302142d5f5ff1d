"""One-shot GPU check (issue 17): finetune against a plain TRL SFTTrainer script on a generated ~1B Llama.

Run by scripts/gpu_check.sh (which installs the carried wheels first). For each case it trains the same data with
the same settings, one process after another, and records tokens/s, MFU against a bf16 matmul peak measured on
the same GPU, peak memory (`torch.cuda.max_memory_allocated()`, from each run's summary.json) and the memory
plan's estimate for the same recipe (finetune.train.memory, the numbers `finetune plan` prints) next to it:

    bf16 LoRA (finetune, and the plain TRL script), QLoRA nf4, full fine-tuning with ZeRO-2 on one GPU,
    packing (SDPA per sequence; flash-attention 2 too when flash_attn is installed; TRL's packing),
    Liger kernels on and off.

The whole check is budgeted to finish in under 8 minutes on one H100/H200: each run is capped (--run-timeout)
and cases left when --budget is spent are listed as skipped, so the page is written whatever happens.
Results go to docs/gpu-<date>.md.

`--dry-run` runs every case the same way on this machine's CPU with the tiny preset (a few steps): cases that
need a CUDA GPU (Liger, flash-attention 2) must be refused there with exit 2, which the page records, so that the
day a GPU is lent its time goes to measuring, not debugging.

Usage:
    python scripts/gpu_check.py [--dry-run] [--out docs/gpu-DATE.md] [--steps N] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_train import PRESETS, Run, Workload, build_workload, machine, measure_matmul_peak, run_one  # noqa: E402

# ~1.2B parameters (Llama-3.2-1B's shape), 20 steps of 4 × 2048 tokens: ~40 s a run on one H100 with start-up.
GPU_SHAPE = dict(PRESETS["1b"], batch=4, steps=20)
DRY_SHAPE = dict(PRESETS["tiny"], batch=4, steps=6, rows=24)


@dataclass
class Case:
    name: str
    tool: str  # finetune or trl
    args: list[str]  # `finetune train --set ...` or bench_trl_baseline.py arguments
    needs_cuda: str = ""  # why the case runs on a CUDA GPU only (a CPU must refuse it with exit 2)
    needs_module: str = ""  # a module that must be importable, else the case is skipped
    full: bool = False  # trains the recipe without an adapter (bench-full.yaml)


ZERO2 = ["--set", "distributed.strategy=deepspeed", "--set", "distributed.zero_stage=2",
         "--set", "distributed.num_processes=1"]
# In order of importance: when the time budget runs out, the last ones are skipped.
CASES = [
    Case("finetune: bf16 LoRA", "finetune", []),
    Case("trl: bf16 LoRA", "trl", ["--checkpointing", "off"]),
    Case("finetune: QLoRA nf4", "finetune", ["--set", "adapter.kind=qlora"]),
    Case("finetune: packed (SDPA per sequence)", "finetune", ["--set", "method.packing=true"]),
    Case("trl: packed", "trl", ["--checkpointing", "off", "--packing"]),
    Case("finetune: Liger", "finetune", ["--set", "training.kernels=liger"], needs_cuda="Liger's Triton kernels"),
    Case("finetune: full, ZeRO-2 (1 GPU)", "finetune", ZERO2, full=True),
    Case("finetune: packed, flash-attention 2", "finetune",
         ["--set", "method.packing=true", "--set", "model.attn_implementation=flash_attention_2"],
         needs_cuda="flash-attention 2", needs_module="flash_attn"),
]


@dataclass
class Result:
    case: Case
    run: Run | None = None
    status: str = "ok"
    plan_bytes: float = float("nan")


def plan_estimate(recipe: Path, args: list[str], device: str) -> float:
    """The memory plan's peak for the recipe with the case's --set overrides (what `finetune plan` prints)."""
    from finetune.recipe import load_recipe
    from finetune.train.memory import estimate, load_shape, sharding_from_recipe

    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    loaded = load_recipe(recipe, overrides)
    r = loaded.recipe
    return estimate(r, load_shape(r), device=device, sharding=sharding_from_recipe(r, None, None)).total


def refused_on_cpu(command: list[str], out: Path, env: dict, timeout: float) -> tuple[bool, str]:
    """Run a CUDA-only case on the CPU: it must exit 2 with one clear line (no traceback)."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out, timeout=timeout)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    ok = proc.returncode == 2 and "Traceback" not in proc.stderr
    return ok, (lines[-1] if lines else f"exit {proc.returncode}")


def full_recipe(recipe: Path) -> Path:
    """The workload's recipe with adapter: {kind: full} (the LoRA fields would be unknown keys there)."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["adapter"] = {"kind": "full"}
    path = recipe.with_name("bench-full.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def command(case: Case, w: Workload, model_dir: Path, data: Path, recipe: Path, out: Path) -> list[str]:
    if case.tool == "finetune":
        recipe = full_recipe(recipe) if case.full else recipe
        return [sys.executable, "-m", "finetune", "train", str(recipe), "--set", f"output.dir={out}", *case.args]
    return [sys.executable, str(REPO / "scripts" / "bench_trl_baseline.py"), "--model", str(model_dir),
            "--data", str(data), "--batch", str(w.batch), "--max-length", str(w.max_length), "--steps", str(w.steps),
            "--lr", str(w.lr), "--lora-r", str(w.lora_r), "--lora-alpha", str(w.lora_alpha),
            "--lora-dropout", str(w.lora_dropout), "--seed", str(w.seed), "--out", str(out), *case.args]


def run_cases(w: Workload, root: Path, paths, device: str, args) -> list[Result]:
    model_dir, data, recipe = paths
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    deadline = time.monotonic() + args.budget
    results = []
    for i, case in enumerate(CASES):
        out = root / "runs" / f"{i}-{case.tool}"
        cmd = command(case, w, model_dir, data, recipe, out)
        left = deadline - time.monotonic()
        print(f"[{i + 1}/{len(CASES)}] {case.name} ({left:.0f} s of the budget left)", file=sys.stderr)
        if case.needs_cuda and device != "cuda":
            ok, line = refused_on_cpu(cmd, out, env, args.run_timeout)
            results.append(Result(case, status=("refused on the CPU, as it must be: " if ok else
                                                "NOT refused cleanly on the CPU: ") + line))
            continue
        if case.needs_module and importlib.util.find_spec(case.needs_module) is None:
            results.append(Result(case, status=f"skipped: {case.needs_module} is not installed"))
            continue
        if left < 30:
            results.append(Result(case, status="skipped: the time budget was spent"))
            continue
        result = Result(case)
        if case.tool == "finetune":
            try:
                result.plan_bytes = plan_estimate(full_recipe(recipe) if case.full else recipe, case.args, device)
            except Exception as exc:  # the page records it; the run still tells the measured peak
                result.status = f"plan failed: {type(exc).__name__}: {exc}"
        result.run = run_one(case.name, ["timeout", str(int(min(args.run_timeout, left))), *cmd], out, env, device,
                             w, warmup=args.warmup, metrics=_metrics(case, out))
        if not result.run.ok:
            result.status = f"failed (log: {out.with_suffix('.log').name})"
        results.append(result)
    return results


def _metrics(case: Case, out: Path) -> Path:
    if case.tool == "finetune":
        from finetune.run.layout import RunDir

        return RunDir(out).metrics
    return out / "metrics.jsonl"


def report(results: list[Result], w: Workload, device: str, peak: float, args, started: float) -> str:
    gpu = device == "cuda"
    mem = "peak GPU memory (max_memory_allocated)" if gpu else "peak RSS (CPU dry run)"
    lines = [
        f"# GPU check, {datetime.date.today().isoformat()}" + ("" if gpu else " (DRY RUN on the CPU)"),
        "",
        f"- command: `bash scripts/gpu_check.sh {' '.join(shlex.quote(a) for a in sys.argv[1:])}`".replace("  ", " "),
        f"- machine: {machine(device, int(os.environ.get('OMP_NUM_THREADS', '0') or 0) or os.cpu_count())}",
        f"- versions: {_versions()}",
        f"- matmul peak: {peak / 1e12:,.2f} TFLOP/s ({'bf16' if gpu else 'fp32'}, measured here)",
        f"- model: Llama-shaped, hidden {w.hidden}, {w.layers} layers, {w.heads} heads ({w.kv_heads} KV), "
        f"intermediate {w.intermediate}, vocab {w.vocab}; LoRA r={w.lora_r} on all linear layers; "
        f"micro batch {w.batch}, max length {w.max_length}, {w.steps} steps; rates over steps {args.warmup}–{w.steps}",
        f"- whole check: {time.monotonic() - started:.0f} s",
        "",
        f"| case | status | first step (s) | s/step | real tok/s | trained tok/s | MFU | {mem} (GiB) "
        "| memory plan (GiB) | plan ÷ measured | mean loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        r = res.run
        if r is None or not r.ok:
            lines.append(f"| {res.case.name} | {res.status} |" + " |" * 9)
            continue
        ratio = res.plan_bytes / r.peak_bytes if r.peak_bytes == r.peak_bytes and r.peak_bytes else float("nan")
        lines.append(
            f"| {res.case.name} | {res.status} | {r.first_step_s:.1f} | {r.s_per_step:.3f} | {r.real_tps:,.0f} "
            f"| {r.trained_tps:,.0f} | {r.mfu / peak:.1%} | {r.peak_bytes / 2**30:.2f} | {res.plan_bytes / 2**30:.2f} "
            f"| {ratio:.2f} | {r.mean_loss:.3f} |")
    lines += ["", "Cases (`finetune train` arguments; TRL: scripts/bench_trl_baseline.py's): " + "; ".join(
        f"{c.name}: `{'adapter.kind: full ' if c.full else ''}{' '.join(c.args) or '(defaults)'}`" for c in CASES),
        "", "On a CPU, the memory plan estimates training memory while peak RSS also holds Python and the libraries, "
        "so only a GPU run compares them.", ""]
    return "\n".join(lines)


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed",
                 "liger-kernel", "flash-attn"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU (no GPU needed)")
    parser.add_argument("--steps", type=int, help="steps per run (default 20 on a GPU, 6 in a dry run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=390, help="seconds for all runs (start the next only if "
                        "30 s are left)")
    parser.add_argument("--run-timeout", type=float, default=120, help="seconds one run may take")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.monotonic()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device != "cuda" and not args.dry_run:
        sys.exit("no CUDA GPU visible: run on a GPU machine, or pass --dry-run")
    shape = dict(GPU_SHAPE if device == "cuda" else DRY_SHAPE)
    if args.steps:
        shape["steps"] = args.steps
    w = Workload(**shape)
    w.rows = w.rows or w.batch * w.steps
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "runs", ignore_errors=True)  # an earlier check's runs would be refused or appended to
    print(f"building a {'~1B' if device == 'cuda' else 'tiny'} model and data in {root}", file=sys.stderr)
    model_dir, data = build_workload(w, root, device)
    from bench_train import write_recipe

    paths = (model_dir, data, write_recipe(w, root, model_dir, data))
    peak = measure_matmul_peak(device)
    results = run_cases(w, root, paths, device, args)
    peak = max(peak, measure_matmul_peak(device))
    page = report(results, w, device, peak, args, started)
    suffix = "" if device == "cuda" else "-dry-run"
    out = args.out or REPO / "docs" / f"gpu-{datetime.date.today().isoformat()}{suffix}.md"
    out.write_text(page)
    print(page)
    print(f"written to {out}", file=sys.stderr)
    failed = [r for r in results if r.status.startswith(("failed", "NOT refused", "plan failed"))]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
