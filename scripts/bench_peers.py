"""The peers of scripts/bench_train.py: axolotl and LLaMA-Factory, each from its own venv, on the same workload.

scripts/bench_peer_venvs.sh installs them from the package index into PEERS_DIR/<name> (default /tmp/peers),
with torch pinned to the CPU build this machine has. Each run gets a config written here with the workload's
settings (LoRA r/alpha/dropout on all linear layers, micro batch, max length, steps, learning rate, constant
schedule, seed, fp32, logging every step, no saving) and the tool's own defaults for everything else; a
`*: no checkpointing` row switches off the activation checkpointing a tool turns on by default.
scripts/bench_hooks/sitecustomize.py writes the same per-step records finetune's metrics.jsonl holds.

What had to be changed in the peers' environments, and why (each is recorded with the table):
- axolotl 0.20 and later need Python >= 3.12, for which this machine's index has no CPU torch 2.13 wheel
  (pip would fetch the CUDA build of several GB): axolotl 0.19.0 on Python 3.11.
- axolotl turns on its Triton LoRA kernels (lora_mlp/qkv/o/embedding_kernel) by default; they allocate on CUDA
  and fail on a CPU ("Torch not compiled with CUDA enabled"): switched off. Its telemetry is switched off
  (AXOLOTL_DO_NOT_TRACK=1): with no network it retries for minutes.
- LLaMA-Factory 0.9.5 imports torchvision and torchaudio unconditionally; the PyPI wheels are built against CUDA
  torch and fail to load with torch 2.13 CPU (torchvision::nms, _torchaudio.so): torchvision is removed
  (transformers does without it) and torchaudio replaced by an empty module (used for audio data only).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
HOOKS = REPO / "scripts" / "bench_hooks"
PEER_VERSIONS = {"axolotl": "0.19.0", "llamafactory": "0.9.5"}
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")


@dataclass
class PeerRun:
    """One peer process: the command, its environment, and where it writes its step records."""

    command: list[str]
    env: dict[str, str]
    metrics: Path


def peer_python(peers_dir: Path, tool: str) -> Path:
    return peers_dir / tool / "bin" / "python"


def versions(python: Path, tool: str) -> dict[str, str]:
    """Versions of the tool and the libraries it trains with, read in its own venv (finetune: this checkout)."""
    names = ([tool] if tool in PEER_VERSIONS else []) + list(LIBRARIES)
    code = ("import importlib.metadata as m, json\n"
            f"print(json.dumps({{n: m.version(n) for n in {names!r}}}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    if tool == "finetune":
        revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
        found = {"finetune": f"git {revision or 'unknown'}", **found}
    return found


def peer_run(tool: str, w, workdir: Path, model_dir: Path, data: Path, out: Path, *, packing: bool,
             checkpointing: bool | None, peers_dir: Path, threads: int) -> PeerRun:
    """Write the tool's config for the workload and return how to run it."""
    out.mkdir(parents=True, exist_ok=True)
    venv = peers_dir / tool
    metrics = out / "metrics.jsonl"
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(HOOKS), "BENCH_METRICS": str(metrics), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
    env.pop("VIRTUAL_ENV", None)
    if tool == "axolotl":
        config = _axolotl_config(w, workdir, model_dir, data, out, packing, checkpointing)
        command = [str(venv / "bin" / "axolotl"), "train", str(config)]
    elif tool == "llamafactory":
        config = _llamafactory_config(w, workdir, model_dir, data, out, packing, checkpointing)
        command = [str(venv / "bin" / "llamafactory-cli"), "train", str(config)]
    else:
        raise ValueError(f"unknown peer {tool}")
    return PeerRun(command, env, metrics)


def _axolotl_config(w, workdir: Path, model_dir: Path, data: Path, out: Path, packing: bool,
                    checkpointing: bool | None) -> Path:
    config = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}],
        "chat_template": "tokenizer_default",  # finetune's ChatML template, from the tokenizer
        "dataset_prepared_path": str(workdir / "axolotl-prepared"),  # reused across repeats, as finetune's cache
        "sequence_len": w.max_length,
        "sample_packing": packing,
        "adapter": "lora", "lora_r": w.lora_r, "lora_alpha": w.lora_alpha, "lora_dropout": w.lora_dropout,
        "lora_target_linear": True,
        # CUDA-only Triton kernels that axolotl turns on by default (see the module docstring)
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False, "lora_embedding_kernel": False,
        "micro_batch_size": w.batch, "gradient_accumulation_steps": 1, "max_steps": w.steps, "num_epochs": 1,
        "learning_rate": w.lr, "lr_scheduler": "constant", "warmup_steps": 0, "seed": w.seed,
        "output_dir": str(out / "output"), "logging_steps": 1, "save_strategy": "no",
        "bf16": False, "fp16": False, "tf32": False,
    }
    if checkpointing is not None:
        config["gradient_checkpointing"] = checkpointing
    path = out / "axolotl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _llamafactory_config(w, workdir: Path, model_dir: Path, data: Path, out: Path, packing: bool,
                         checkpointing: bool | None) -> Path:
    info = workdir / "llamafactory-data"
    info.mkdir(exist_ok=True)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    (info / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": str(data), "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}}))
    config = {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "lora_rank": w.lora_r, "lora_alpha": w.lora_alpha, "lora_dropout": w.lora_dropout,
        "lora_target": "all",
        "dataset": "bench", "dataset_dir": str(info),
        "template": "chatml",  # the same ChatML turns as finetune's template; trains the assistant replies
        "cutoff_len": w.max_length, "packing": packing,
        "per_device_train_batch_size": w.batch, "gradient_accumulation_steps": 1, "max_steps": w.steps,
        "learning_rate": w.lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": w.seed,
        "output_dir": str(out / "output"), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "bf16": False, "dataloader_num_workers": 0,
    }
    if checkpointing is False:
        config["disable_gradient_checkpointing"] = True
    path = out / "llamafactory.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
