"""Side-by-side SFT benchmark: `finetune train` against the tools a user would pick instead, on the same work.

Builds a Llama-shaped model of the chosen size (random weights, word-level tokenizer with a ChatML template),
generates conversations with a realistic spread of lengths, and trains LoRA on all linear layers for a fixed
number of steps, the same batch size and max_length, each tool in its own process, one after another:

- `finetune train RECIPE` (the CLI, `python -m finetune`), with a recipe this script writes, and `--set`
  variants that switch one speed choice back off each (the ablation rows, `ft: ...`);
- scripts/bench_trl_baseline.py, a plain TRL script with `assistant_only_loss=True` (same trained tokens);
- axolotl and LLaMA-Factory through their own CLIs, from venvs that scripts/bench_peer_venvs.sh installs
  (scripts/bench_peers.py writes their configs and says what their environments needed).

Every tool is run without packing and with its own packing (finetune's and TRL's keep rows apart; axolotl's
and LLaMA-Factory's on a CPU let packed rows attend to each other, which costs them less attention).
Runs alternate (every row once; then again for each repeat) and the table gives the median per row:
time to the first optimizer step from process start, steady-state seconds per step, trained (non-padding,
unmasked) tokens/s, real (non-padding) tokens/s, total tokens/s including padding, peak memory (the process's
peak RSS on a CPU, `torch.cuda.max_memory_allocated` on a GPU), MFU against this machine's measured matmul
peak, and ratios to the TRL baseline. The table is printed and appended to docs/benchmarks.md with the date,
machine and command.

Usage:
    bash scripts/bench_peer_venvs.sh                   # once: axolotl and LLaMA-Factory venvs under /tmp/peers
    python scripts/bench_train.py --threads 1          # CPU: the 'tiny' preset, every tool, with and without packing
    python scripts/bench_train.py --preset 1b --repeats 2 --only trl,finetune
    python scripts/bench_train.py --steps 20 --only trl,finetune --no-append
    python scripts/bench_train.py --only finetune,'ft: padded batches'   # ablation rows
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_peers import peer_python, peer_run, versions  # noqa: E402

PRESETS = {
    # 7.0M parameters, 2,000 conversations, micro batch 4, 60 steps: the workload the peers are compared on
    # (issue 17); a CPU runs each tool in about a minute.
    "tiny": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, vocab=8192,
                 max_length=512, batch=4, steps=60, rows=2000),
    # Llama-3.2-1B's shape: for a GPU (bf16).
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
               max_length=2048, batch=8, steps=30),
}

# Rows: name -> (tool, packing, extra arguments). The comparison rows run each tool with its defaults (and, where a
# tool turns activation checkpointing on, without it too), without and with its packing; the `ft: ...` ablation
# rows switch one of finetune's defaults back (or one option on), so each shows what that choice is worth.
COMPARISON = {
    "finetune": ("finetune", False, []),
    "finetune: packed": ("finetune", True, ["--set", "method.packing=true"]),
    "trl": ("trl", False, ["--checkpointing", "default"]),
    "trl: packed": ("trl", True, ["--checkpointing", "default", "--packing"]),
    "trl: no checkpointing": ("trl", False, ["--checkpointing", "off"]),
    "trl: packed, no checkpointing": ("trl", True, ["--checkpointing", "off", "--packing"]),
    "axolotl": ("axolotl", False, []),
    "axolotl: packed": ("axolotl", True, []),
    "llamafactory": ("llamafactory", False, []),
    "llamafactory: packed": ("llamafactory", True, []),
    "llamafactory: no checkpointing": ("llamafactory", False, ["no-checkpointing"]),
    "llamafactory: packed, no checkpointing": ("llamafactory", True, ["no-checkpointing"]),
}
ABLATIONS = {
    "ft: padded batches": ["--set", "training.batching=padded"],
    "ft: grouped batches": ["--set", "training.batching=grouped"],
    "ft: full LM-head metrics (TRL's)": ["--set", "training.token_metrics=true"],
    "ft: chunked LM head": ["--set", "training.lm_head=chunked"],
    "ft: gradient checkpointing": ["--set", "training.gradient_checkpointing=true"],
    "ft: adamw_torch (not fused)": ["--set", "training.optimizer=adamw_torch"],
    "ft: torch.compile": ["--set", "training.compile=true"],
}
PEERS = ("axolotl", "llamafactory")

SHAPE_OPTIONS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "max_length", "batch", "steps",
                 "rows")


@dataclass
class Workload:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_length: int
    batch: int
    steps: int
    rows: int = 0  # default: batch × steps, so every run trains exactly one epoch of the same rows
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    lr: float = 1e-4
    seed: int = 0
    lengths: list[int] = field(default_factory=list)  # token length of each row after truncation

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matmul_params(self) -> tuple[int, int]:
        """(frozen matmul parameters incl. the LM head, LoRA parameters) of the model."""
        h, hd, i = self.hidden, self.head_dim, self.intermediate
        shapes = [(h, self.heads * hd), (h, self.kv_heads * hd), (h, self.kv_heads * hd), (self.heads * hd, h),
                  (h, i), (h, i), (i, h)]
        frozen = self.layers * sum(a * b for a, b in shapes) + self.vocab * h
        lora = self.layers * sum(self.lora_r * (a + b) for a, b in shapes)
        return frozen, lora

    def flops_per_real_token(self) -> float:
        """Model FLOPs of one LoRA training token (no padding, no recomputation counted).

        Frozen matmuls: forward 2P plus the backward to their inputs 2P (no weight gradients); LoRA matmuls 6P;
        attention: forward 2·L·d_attn·T per token for a row of T tokens (causal), times 3 with the backward,
        weighted by tokens, so T is E[T²]/E[T] over the rows.
        """
        frozen, lora = self.matmul_params()
        t_eff = sum(t * t for t in self.lengths) / max(sum(self.lengths), 1)
        attention = 3 * 2 * self.layers * self.heads * self.head_dim * t_eff
        return 4 * frozen + 6 * lora + attention


# --- workload ---------------------------------------------------------------------------------------------------


def build_tokenizer(vocab: int):
    """A word-level tokenizer ('w0'... one token each) with ChatML special tokens and finetune's tiny template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from finetune.model.tiny import CHAT_TEMPLATE, IM_END, IM_START, PAD_TOKEN

    specials = [PAD_TOKEN, IM_START, IM_END, "<unk>"]
    words = ["system", "user", "assistant"]
    words += [f"w{i}" for i in range(vocab - len(specials) - len(words))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=PAD_TOKEN, pad_token=PAD_TOKEN, eos_token=IM_END, unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 20,
    )


def generate_conversations(w: Workload, rng: random.Random) -> list[dict]:
    """Chats whose lengths spread like real SFT data: log-normal around ~30% of max_length, a tail past it.

    1 to 3 user/assistant exchanges, a system prompt in a third of them, answers about twice the prompts.
    """
    rows = []
    vocab_words = w.vocab - 8
    for _ in range(w.rows):
        total = int(min(max(rng.lognormvariate(0, 0.75) * 0.3 * w.max_length, 24), 1.4 * w.max_length))
        turns = rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": _words(rng, max(4, total // 12), vocab_words)})
        per_turn = max(8, (total - 5 * (2 * turns + len(messages))) // turns)
        for _ in range(turns):
            prompt = max(3, int(per_turn * rng.uniform(0.2, 0.45)))
            messages.append({"role": "user", "content": _words(rng, prompt, vocab_words)})
            messages.append({"role": "assistant", "content": _words(rng, max(3, per_turn - prompt), vocab_words)})
        rows.append({"messages": messages})
    return rows


def _words(rng: random.Random, n: int, vocab_words: int) -> str:
    return " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(n))


def build_workload(w: Workload, root: Path, device: str) -> tuple[Path, Path]:
    """Write the model directory and the data file; fill `w.lengths`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = build_tokenizer(w.vocab)
    rows = generate_conversations(w, random.Random(w.seed))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w.lengths = [min(len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]), w.max_length)
                 for r in rows]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=w.hidden, intermediate_size=w.intermediate,
        num_hidden_layers=w.layers, num_attention_heads=w.heads, num_key_value_heads=w.kv_heads,
        max_position_embeddings=max(2048, w.max_length), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(w.seed)
    with torch.device(device):  # a ~1B model initialises in seconds on a GPU, in minutes on its host's CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    return model_dir, data


def write_recipe(w: Workload, root: Path, model_dir: Path, data: Path) -> Path:
    import yaml

    recipe = {
        "name": "bench",
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(data), "format": "messages"}]},
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", "r": w.lora_r, "alpha": w.lora_alpha, "dropout": w.lora_dropout,
                    "target_modules": "all-linear"},
        "training": {"learning_rate": w.lr, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                     "max_steps": w.steps, "micro_batch_size": w.batch, "max_length": w.max_length,
                     "logging_steps": 1, "seed": w.seed},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --- measuring --------------------------------------------------------------------------------------------------


def measure_matmul_peak(device: str, seconds: float = 2.0) -> float:
    """Best FLOP/s of a square matmul in the dtype the runs compute in (fp32 on a CPU, bf16 on a GPU)."""
    import torch

    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


@dataclass
class Run:
    name: str
    ok: bool
    first_step_s: float = float("nan")
    s_per_step: float = float("nan")
    cpu_s_per_step: float = float("nan")
    trained_tps: float = float("nan")
    real_tps: float = float("nan")
    total_tps: float = float("nan")
    peak_bytes: float = float("nan")
    mean_loss: float = float("nan")
    mfu: float = float("nan")


def run_one(name: str, cmd: list[str], out: Path, env: dict, device: str, w: Workload, warmup: int,
            metrics: Path | None = None) -> Run:
    """Start one training process, wait for it, and read its step records (`metrics`, default out/metrics.jsonl)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = metrics or out / "metrics.jsonl"
    log = out.with_suffix(".log")
    started = time.time()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=out)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's peak RSS (and its waited-for children's)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not metrics.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"  {name}: FAILED (exit {proc.returncode}); last lines of {log}:", *tail, sep="\n    ", file=sys.stderr)
        return Run(name, ok=False)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records = [r for r in records if "loss" in r and "num_trained_tokens" in r]
    first, last = next(r for r in records if r["step"] >= warmup), records[-1]
    seconds = last["time"] - first["time"]
    steps = last["step"] - first["step"]
    if device == "cuda":
        from finetune.run.layout import RunDir

        # finetune's run directory (output.dir = out); the TRL baseline writes its summary under the same name
        summary = json.loads(RunDir(out).summary.read_text())
        peak_bytes = summary.get("peak_gpu_memory_bytes") or float("nan")
    else:
        peak_bytes = usage.ru_maxrss * 1024  # kilobytes on Linux
    real = last["num_tokens"] - first["num_tokens"]
    return Run(
        name, ok=True,
        first_step_s=records[0]["time"] - started,
        s_per_step=seconds / steps,
        cpu_s_per_step=(last["cpu_seconds"] - first["cpu_seconds"]) / steps,
        trained_tps=(last["num_trained_tokens"] - first["num_trained_tokens"]) / seconds,
        real_tps=real / seconds,
        total_tps=(last["num_input_tokens"] - first["num_input_tokens"]) / seconds,
        peak_bytes=peak_bytes,
        mean_loss=statistics.fmean(r["loss"] for r in records),
        mfu=real * w.flops_per_real_token() / seconds,  # FLOP/s until main() divides by the peak
    )


def median_run(runs: list[Run]) -> Run:
    ok = [r for r in runs if r.ok]
    if not ok:
        return runs[0]
    fields = ("first_step_s", "s_per_step", "cpu_s_per_step", "trained_tps", "real_tps", "total_tps", "peak_bytes",
              "mean_loss", "mfu")
    return Run(ok[0].name, True, **{f: statistics.median(getattr(r, f) for r in ok) for f in fields})


def fastest_peer(results: list[Run], rows: dict, packing: bool) -> Run | None:
    """The peer row (any tool but finetune) with the most real tokens/s, with or without packing."""
    peers = [r for r in results if r.ok and rows[r.name][0] != "finetune" and rows[r.name][1] == packing]
    return max(peers, key=lambda r: r.real_tps, default=None)


def table(results: list[Run], rows: dict) -> str:
    """The markdown table, each row against the fastest peer row with the same packing."""
    lines = [
        "| run | first step (s) | s/step | CPU s/step | real tok/s | trained tok/s | total tok/s | peak mem (MiB) "
        "| MFU | mean loss | real tok/s ÷ fastest peer | peak mem ÷ fastest peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.name} | failed |" + " |" * 11)
            continue
        peer = fastest_peer(results, rows, rows[r.name][1])
        ratio = f"{r.real_tps / peer.real_tps:.2f}×" if peer else "n/a"
        mem_ratio = f"{r.peak_bytes / peer.peak_bytes:.2f}×" if peer else "n/a"
        bold = "**" if rows[r.name][0] == "finetune" and not r.name.startswith("ft:") else ""
        lines.append(
            f"| {bold}{r.name}{bold} | {r.first_step_s:.1f} | {r.s_per_step:.3f} | {r.cpu_s_per_step:.3f} "
            f"| {r.real_tps:,.0f} | {r.trained_tps:,.0f} | {r.total_tps:,.0f} | {r.peak_bytes / 2**20:,.0f} "
            f"| {r.mfu:.1%} | {r.mean_loss:.3f} | {ratio} | {mem_ratio} |"
        )
    lines += ["", *verdict(results, rows)]
    return "\n".join(lines)


def verdict(results: list[Run], rows: dict) -> list[str]:
    """One line per packing mode: finetune's defaults against the fastest peer (issue 17's goal: 1.5x)."""
    out = []
    for packing, name in ((False, "finetune"), (True, "finetune: packed")):
        ours = next((r for r in results if r.name == name and r.ok), None)
        peer = fastest_peer(results, rows, packing)
        if ours and peer:
            out.append(
                f"{name} vs the fastest peer ({peer.name}): real tokens/s {ours.real_tps / peer.real_tps:.2f}×, "
                f"first step {ours.first_step_s:.1f} s vs {peer.first_step_s:.1f} s, "
                f"peak memory {ours.peak_bytes / peer.peak_bytes:.2f}×.")
    return out


def machine(device: str, threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs{gpu}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}; {threads} threads per run; "
            f"load average {load:.2f} at start")


# --- main -------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model and batch shape (default: tiny on a "
                        "CPU, 1b on a GPU); the options below override single values")
    for key in SHAPE_OPTIONS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state rates")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the table shows medians")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: all CPUs)")
    parser.add_argument("--only", help="comma-separated row names to run (default: the comparison rows)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="an extra finetune row: its name and its `finetune train` arguments")
    parser.add_argument("--peers-dir", type=Path, default=Path("/tmp/peers"),
                        help="where scripts/bench_peer_venvs.sh installed axolotl and LLaMA-Factory")
    parser.add_argument("--workdir", type=Path, help="keep the model, data and runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to --out")
    return parser.parse_args()


def split_row_names(text: str, rows) -> list[str]:
    """Comma-separated row names, keeping whole a name that holds a comma ('llamafactory: packed, no checkpointing')."""
    parts, names = [p.strip() for p in text.split(",")], []
    while parts:
        take = next((k for k in range(len(parts), 1, -1) if ", ".join(parts[:k]) in rows), 1)
        names.append(", ".join(parts[:take]))
        parts = parts[take:]
    return names


def select_rows(args: argparse.Namespace) -> dict[str, tuple[str, bool, list[str]]]:
    rows = dict(COMPARISON) | {n: ("finetune", False, a) for n, a in ABLATIONS.items()}
    for item in args.variant:
        name, _, rest = item.partition("=")
        rows[name] = ("finetune", "method.packing=true" in rest, shlex.split(rest))
    wanted = split_row_names(args.only, rows) if args.only else list(COMPARISON) + [
        v.partition("=")[0] for v in args.variant]
    unknown = [n for n in wanted if n not in rows]
    if unknown:
        sys.exit(f"--only: unknown rows {unknown}; rows: {list(rows)}")
    missing = sorted({rows[n][0] for n in wanted if rows[n][0] in PEERS
                      and not peer_python(args.peers_dir, rows[n][0]).exists()})
    if missing:
        print(f"skipping {missing}: no venv under {args.peers_dir} (run scripts/bench_peer_venvs.sh)", file=sys.stderr)
    return {n: rows[n] for n in wanted if rows[n][0] not in missing}


def tool_versions(rows: dict, peers_dir: Path) -> list[str]:
    """One line per tool in the table: its version and the libraries it trains with."""
    lines = []
    for tool in dict.fromkeys(kind for kind, _, _ in rows.values()):
        found = versions(peer_python(peers_dir, tool) if tool in PEERS else Path(sys.executable), tool)
        lines.append(f"  - {tool}: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return lines


def command_for(name: str, row, w: Workload, root: Path, out: Path, paths, env: dict, args, threads: int):
    """(command, environment, metrics file) of one row."""
    tool, packing, extra = row
    model_dir, data, recipe = paths
    if tool == "finetune":
        from finetune.run.layout import RunDir

        return ([sys.executable, "-m", "finetune", "train", str(recipe), "--set", f"output.dir={out}", *extra], env,
                RunDir(out).metrics)
    if tool == "trl":
        baseline = [sys.executable, str(REPO / "scripts" / "bench_trl_baseline.py"), "--model", str(model_dir),
                    "--data", str(data), "--batch", str(w.batch), "--max-length", str(w.max_length),
                    "--steps", str(w.steps), "--lr", str(w.lr), "--lora-r", str(w.lora_r),
                    "--lora-alpha", str(w.lora_alpha), "--lora-dropout", str(w.lora_dropout), "--seed", str(w.seed)]
        return baseline + ["--out", str(out)] + extra, env, None
    run = peer_run(tool, w, root, model_dir, data, out, packing=packing,
                   checkpointing=False if "no-checkpointing" in extra else None, peers_dir=args.peers_dir,
                   threads=threads)
    return run.command, run.env, run.metrics


def main() -> None:
    args = parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("1b" if device == "cuda" else "tiny")
    shape = dict(PRESETS[preset])
    shape.update({k: v for k in SHAPE_OPTIONS if (v := getattr(args, k)) is not None})
    w = Workload(**shape)
    w.rows = w.rows or w.batch * w.steps
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = select_rows(args)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    # runs of an earlier invocation in the same --workdir would be refused ("already holds a run") or appended to
    shutil.rmtree(root / "runs", ignore_errors=True)
    print(f"building the workload in {root} ({preset} preset, {device})", file=sys.stderr)
    model_dir, data = build_workload(w, root, device)
    paths = (model_dir, data, write_recipe(w, root, model_dir, data))
    peak = measure_matmul_peak(device)
    print(f"matmul peak: {peak / 1e9:,.1f} GFLOP/s ({threads} threads; measured again at the end)", file=sys.stderr)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    runs: dict[str, list[Run]] = {name: [] for name in rows}
    for repeat in range(args.repeats):
        for name, row in rows.items():
            out = root / "runs" / f"{len(runs[name])}-{name.replace(' ', '_').replace(':', '').replace(',', '')}"
            cmd, run_env, metrics = command_for(name, row, w, root, out, paths, env, args, threads)
            print(f"[{repeat + 1}/{args.repeats}] {name}", file=sys.stderr)
            runs[name].append(run_one(name, cmd, out, run_env, device, w, args.warmup, metrics))

    # Measured again at the end, the best of both: load from other work can only lower it.
    peak = max(peak, measure_matmul_peak(device))
    results = [median_run(r) for r in runs.values()]
    for r in results:
        r.mfu /= peak
    frozen, lora = w.matmul_params()
    lengths = sorted(w.lengths)
    command = "python scripts/bench_train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = "\n".join([
        f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} — {preset} preset on {device}",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine(device, threads)}",
        "- versions:",
        *tool_versions(rows, args.peers_dir),
        f"- matmul peak: {peak / 1e9:,.1f} GFLOP/s ({'bf16' if device == 'cuda' else 'fp32'}, measured)",
        f"- model: Llama-shaped, hidden {w.hidden}, {w.layers} layers, {w.heads} heads ({w.kv_heads} KV), "
        f"intermediate {w.intermediate}, vocab {w.vocab}: {frozen / 1e6:,.1f}M matmul parameters, "
        f"LoRA r={w.lora_r} on all linear layers ({lora / 1e6:,.2f}M trainable)",
        f"- data: {w.rows} generated chats, tokens per row p10/p50/p90/max {lengths[len(lengths) // 10]}/"
        f"{lengths[len(lengths) // 2]}/{lengths[9 * len(lengths) // 10]}/{lengths[-1]} after truncation to "
        f"{w.max_length}; micro batch {w.batch}, {w.steps} steps, rates over steps {args.warmup}–{w.steps}; "
        f"median of {args.repeats} alternating runs",
        f"- model FLOPs per real token: {w.flops_per_real_token() / 1e6:,.1f}M (see the notes at the top)",
        "",
        table(results, rows),
        "",
    ])
    print(report)
    if not args.no_append:
        append_report(args.out, report)
        print(f"appended to {args.out}", file=sys.stderr)


HEADER = """# Benchmarks

Results of `python scripts/bench_train.py` (newest last). Each section says when, on what machine and with
what command it was taken; numbers from a machine shared with other work are marked as such and are not
comparable with a quiet machine's.

How to read the columns:

- **first step (s)**: from the start of the process to the end of the first optimizer step (imports, data,
  model load, trainer set-up, one step).
- **s/step**, **tok/s**: steady state, between the warm-up step and the last step. **CPU s/step**: the
  training process's own CPU time per step (all its threads): less sensitive than wall time to other
  work on the machine, so a check on a busy machine.
- **trained tok/s**: tokens that carry loss (assistant replies and their end-of-turn token; labels ≠ -100).
  **real tok/s**: all non-padding tokens. **total tok/s**: every position of the batches, padding included.
- **peak mem**: on a CPU the peak RSS of the training process (everything: Python, libraries, model, data);
  on a GPU `torch.cuda.max_memory_allocated()`.
- **MFU**: model FLOPs of the real tokens per second over the matmul peak measured on the same machine in the
  same dtype. LoRA FLOPs per token are 4·P for the frozen matmuls (forward and input gradients, no weight
  gradients), 6·P for the LoRA matrices, and 6·L·d·T for causal attention; padding and recomputation do not
  count as useful work.
- **mean loss**: average logged loss, a check that both sides train the same thing.
- Rows `ft: ...` are `finetune train` with one default switched back off (or one option on) through `--set`.

"""


def append_report(path: Path, report: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    path.write_text(text.rstrip("\n") + "\n\n" + report)


if __name__ == "__main__":
    main()
