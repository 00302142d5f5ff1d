"""Real multi-process training on the CPU (gloo): 2-process DDP, DeepSpeed ZeRO-2 and ZeRO-3, LoRA SFT.

Each launched run trains the same 4 steps as a single-process run at the same global batch (8 rows:
one process x 8, or two x 4, in the same order), so the logged losses must agree step by step.
Tolerance: 1e-4 absolute per step; measured differences are below 1e-6 (float32 summation order).
The first DeepSpeed run on a machine JIT-compiles DeepSpeed's shared-memory CPU allreduce
(cached in ~/.cache/torch_extensions afterwards); see docs/distributed-cpu-2026-11-22.md.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from finetune.recipe import load_recipe
from tests.conftest import library_notices, run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

STEPS = 4
TOLERANCE = 1e-4


def free_port() -> int:
    """Another run on this machine may hold accelerate's default port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_recipe(tmp_path: Path, name: str, micro_batch_size: int, distributed: dict | None = None,
                data: str = "builtin:sample_chat.jsonl", steps: int = STEPS, adapter: dict | None = None,
                model: dict | None = None) -> Path:
    recipe = {
        "name": name,
        "model": {"path": "builtin:tiny-llama", **(model or {})},
        "data": {"train": [{"path": data, "max_rows": 64 if steps == STEPS else 16 * steps}]},
        "method": {"kind": "sft"},
        "adapter": adapter or {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 1e-2, "max_steps": steps, "micro_batch_size": micro_batch_size,
                     "max_length": 128, "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler": "constant"},
        "output": {"dir": str(tmp_path / "runs" / name)},
    }
    if distributed:
        recipe["distributed"] = {"num_processes": 2, "main_port": free_port(), **distributed}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def launch(path: Path) -> tuple[Path, str]:
    """Launch through the real launcher, keeping the processes' stderr to look at."""
    from finetune.launch.launcher import launch_training

    output = {}

    def runner(argv, env):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        output["stderr"] = result.stderr
        return result.returncode

    run_dir = launch_training(load_recipe(path), runner=runner, log=lambda _: None)
    return run_dir, output["stderr"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, torch_one_thread) -> list[float]:
    """Losses of one process at micro batch 8 (also builds the tiny model the workers then reuse)."""
    from finetune.train.run import run_training

    tmp = tmp_path_factory.mktemp("single")
    run_dir = run_training(load_recipe(make_recipe(tmp, "single", 8)), log=lambda _: None)
    values = losses(run_dir)
    assert len(values) == STEPS
    return values


def assert_agrees(values: list[float], reference: list[float], tolerance: float = TOLERANCE) -> None:
    assert len(values) == len(reference), values  # one line per step: only the main process logs
    assert max(abs(a - b) for a, b in zip(values, reference, strict=True)) < tolerance, (values, reference)


def test_ddp_two_processes_match_one_process_and_only_the_main_one_writes(tmp_path, reference):
    from peft import PeftConfig

    run_dir, stderr = launch(make_recipe(tmp_path, "ddp", 4, {"strategy": "ddp"}))
    assert_agrees(losses(run_dir), reference)
    assert stderr.count(f"step 1/{STEPS} ") == 1 and stderr.count("data data.train[0]") == 1, stderr
    # Nothing from the libraries, e.g. torch's find_unused_parameters warning, once per rank, when DDP searches
    # every step for unused parameters in a model that has none.
    assert library_notices(stderr) == [], stderr
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == STEPS
    assert len(json.loads((run_dir / "audit.json").read_text())["datasets"]) == 1
    assert PeftConfig.from_pretrained(run_dir / "adapter").r == 8
    assert yaml.safe_load((run_dir / "accelerate_config.yaml").read_text())["distributed_type"] == "MULTI_GPU"
    assert not (run_dir / "deepspeed.json").exists()


def test_deepspeed_zero2_two_processes_match_one_process(tmp_path, reference):
    run_dir, _ = launch(make_recipe(tmp_path, "zero2", 4, {"strategy": "deepspeed", "zero_stage": 2}))
    assert_agrees(losses(run_dir), reference)
    assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2


def test_deepspeed_zero3_from_the_cli_keeps_the_files_that_ran(tmp_path, reference):
    """The issue's acceptance run, as a user types it."""
    from safetensors.torch import load_file

    path = make_recipe(tmp_path, "zero3", 4, {"strategy": "deepspeed", "zero_stage": 3})
    result = run_cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base weights loaded straight into ZeRO-3 shards" in result.stderr  # zero.Init, not a full copy each
    run_dir = tmp_path / "runs" / "zero3"
    ds_file = (run_dir / "deepspeed.json").resolve()
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 3
    acc = yaml.safe_load((run_dir / "accelerate_config.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED" and acc["deepspeed_config"]["deepspeed_config_file"] == str(ds_file)
    assert_agrees(losses(run_dir), reference)
    weights = load_file(run_dir / "adapter/adapter_model.safetensors")  # gathered, not one process's shards
    lora_a = [w for name, w in weights.items() if "lora_A" in name]
    assert lora_a and all(w.dim() == 2 and w.shape[0] == 8 and w.shape[1] > 0 for w in lora_a)


def test_bad_data_row_met_by_the_workers_ends_the_launch_with_exit_2(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([good] * 5 + ['{"messages": [oops'] + [good] * 3) + "\n")
    path = make_recipe(tmp_path, "bad", 4, {"strategy": "ddp"}, data=str(data))
    result = run_cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: training stopped: " in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].endswith(f"{data}:6: malformed JSON at column 15: Expecting value")


QLORA = {"kind": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "quant_storage": "float32"}


def test_qlora_under_zero3_loads_and_trains_on_two_processes(tmp_path, torch_one_thread):
    # QLoRA + ZeRO-3 is allowed by the launch rules when the 4-bit storage dtype is the model's (rule
    # adapter.quant_storage); then the loader gives no device_map under ZeRO-3 and the run trains.
    from finetune.train.run import run_training

    model = {"dtype": "float32"}
    single = run_training(load_recipe(make_recipe(tmp_path, "qlora1", 8, adapter=QLORA, model=model)),
                          log=lambda _: None)
    run_dir, _ = launch(make_recipe(tmp_path, "qlora3", 4, {"strategy": "deepspeed", "zero_stage": 3},
                                    adapter=QLORA, model=model))
    # 4-bit matmuls sum in another order when sharded: measured differences up to 6e-4 over 4 steps
    assert_agrees(losses(run_dir), losses(single), tolerance=2e-3)


def test_loader_and_rules_agree_on_where_qlora_loads(monkeypatch):
    import transformers.integrations as integrations

    from finetune.launch.rules import Context, Machine, check_launch
    from finetune.model.load import quantized_placement
    from finetune.recipe import recipe_from_dict

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert quantized_placement("cuda") == {"": 1}  # its own GPU per process, never every process on GPU 0
    assert quantized_placement("cpu") == {"": "cpu"}
    monkeypatch.setattr(integrations, "is_deepspeed_zero3_enabled", lambda: True)
    assert quantized_placement("cuda") is None  # ZeRO-3's zero.Init places the shards
    base = {"model": {"path": "x", "dtype": "bfloat16"}, "data": {"train": [{"path": "x"}]}, "method": {"kind": "sft"},
            "distributed": {"strategy": "deepspeed", "zero_stage": 3, "num_processes": 2}}
    machine = Machine(gpus=2, cpus=4, deepspeed_installed=True)
    check_launch(Context(recipe_from_dict({**base, "adapter": {**QLORA, "quant_storage": "bfloat16"}}), machine))
    with pytest.raises(Exception) as refused:
        check_launch(Context(recipe_from_dict({**base, "adapter": {**QLORA, "quant_storage": "uint8"}}), machine))
    assert "adapter.quant_storage" in refused.value.render()


def test_sigint_stops_every_process_at_one_step_and_the_printed_command_resumes(tmp_path, torch_one_thread):
    import os
    import shlex
    import signal
    import sys

    from finetune.train.run import run_training

    steps = 12
    reference = losses(run_training(load_recipe(make_recipe(tmp_path, "whole", 8, steps=steps)), log=lambda _: None))
    path = make_recipe(tmp_path, "stopped", 4, {"strategy": "ddp"}, steps=steps)
    child = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(path)], cwd=tmp_path, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                             env=os.environ.copy())
    lines = []
    for line in child.stderr:
        lines.append(line)
        if line.startswith(f"step 1/{steps} ") and "SIGINT" not in "".join(lines):
            child.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the foreground command
    stderr = "".join(lines)
    assert child.wait(timeout=300) == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    stopped_at = int(stderr.split("training stopped at step ")[1].split("/")[0])
    assert 1 <= stopped_at < steps
    run_dir = tmp_path / "runs" / "stopped"
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped_at}" / "finetune_checkpoint.json").is_file()
    command = stderr.split("Resume with:\n")[1].splitlines()[0].strip()
    assert command == f"finetune train {path} --resume"
    resumed = subprocess.run([sys.executable, "-m", *shlex.split(command)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=os.environ.copy())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{stopped_at}'} (step {stopped_at})" in resumed.stderr
    assert_agrees(losses(run_dir), reference)  # every step once, each as the uninterrupted run's
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == steps and [r["step"] for r in summary["resumes"]] == [stopped_at]
