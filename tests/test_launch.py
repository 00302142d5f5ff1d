"""Launching: generated and shipped configs, the launch plan, the refusal rules, and the worker contract.

Nothing here trains; tests/test_distributed.py runs real multi-process training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.launch.configs import configs_dir, deepspeed_config, fsdp_config
from finetune.launch.rules import Machine
from finetune.recipe import load_recipe
from tests.conftest import REPO, run_cli

CPU_BOX = Machine(gpus=0, cpus=2, deepspeed_installed=True)
# A machine with GPUs cannot be had here: rules and plans that depend on one get these facts instead.
GPU_BOX = Machine(gpus=2, cpus=16, deepspeed_installed=True)


def write_recipe(tmp_path: Path, name: str = "r", **sections) -> Path:
    recipe = {
        "name": name,
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"path": "builtin:sample_chat.jsonl"}]},
        "method": {"kind": "sft"},
        "training": {"micro_batch_size": 4},
        "output": {"dir": str(tmp_path / "runs" / name)},
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_shipped_configs_are_what_the_recipe_fields_generate():
    root = configs_dir()
    expected = {
        "deepspeed/zero1.json": deepspeed_config(1),
        "deepspeed/zero2.json": deepspeed_config(2),
        "deepspeed/zero3.json": deepspeed_config(3),
        "deepspeed/zero3-offload.json": deepspeed_config(3, offload_optimizer=True, offload_params=True),
    }
    for name, config in expected.items():
        assert json.loads((root / name).read_text()) == config, name
    for name, sharding in {"fsdp2-full-shard": "full_shard", "fsdp2-shard-grad-op": "shard_grad_op"}.items():
        data = yaml.safe_load((root / f"accelerate/{name}.yaml").read_text())
        assert data == {"distributed_type": "FSDP", "fsdp_config": fsdp_config(sharding)}, name
    assert "train_batch_size" not in deepspeed_config(3)  # the ZeRO-3 zero.Init trap (ENV.md)


def test_train_writes_the_launch_files_and_runs_the_recorded_command(tmp_path):
    from finetune.launch.launcher import launch_training

    path = write_recipe(tmp_path, distributed={"strategy": "deepspeed", "zero_stage": 3, "num_processes": 2})
    calls = []
    run_dir = launch_training(
        load_recipe(path), runner=lambda argv, env: calls.append((argv, env)) or 0, log=lambda _: None,
        machine=CPU_BOX,
    )
    (argv, env), = calls
    acc_file, recipe_file = run_dir.resolve() / "accelerate_config.yaml", run_dir.resolve() / "recipe.yaml"
    assert argv == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_file),
                    "-m", "finetune.launch.worker", str(recipe_file)]
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"]
    acc = yaml.safe_load(acc_file.read_text())
    assert acc["distributed_type"] == "DEEPSPEED" and acc["num_processes"] == 2
    assert acc["deepspeed_config"]["deepspeed_config_file"] == str(run_dir.resolve() / "deepspeed.json")
    assert acc["deepspeed_config"]["zero3_init_flag"] is True
    assert json.loads((run_dir / "deepspeed.json").read_text()) == deepspeed_config(3)
    assert load_recipe(recipe_file).recipe == load_recipe(path).recipe  # the workers read the same recipe
    assert " ".join(argv[1:]) in (run_dir / "launch.sh").read_text()


def test_generated_configs_are_accepted_by_accelerate_launch(tmp_path, monkeypatch):
    """accelerate's own launcher parses each file and builds the environment its processes would get."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from finetune.launch.launcher import prepare_launch

    cases = {
        "ddp": ({"strategy": "ddp", "num_processes": 2}, CPU_BOX),
        "zero2": ({"strategy": "deepspeed", "zero_stage": 2, "num_processes": 2, "offload_optimizer": True}, CPU_BOX),
        "zero3": ({"strategy": "deepspeed", "config": "zero3-offload", "num_processes": 2}, CPU_BOX),
        "zero3-2-machines": ({"strategy": "deepspeed", "config": "zero3-offload", "num_processes": 1,
                              "num_machines": 2, "machine_rank": 1, "main_address": "10.0.0.1"}, GPU_BOX),
        "fsdp": ({"strategy": "fsdp", "fsdp_auto_wrap": "size", "fsdp_min_params": 1000}, GPU_BOX),
        "named-fsdp": ({"strategy": "fsdp", "config": "fsdp2-shard-grad-op", "num_processes": 2}, GPU_BOX),
    }
    for name, (distributed, machine) in cases.items():
        plan = prepare_launch(load_recipe(write_recipe(tmp_path, name, distributed=distributed)), machine)
        for file, text in plan.files.items():
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text)
        args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(plan.argv[3:]))
        assert args.num_processes == 2, name
        with monkeypatch.context() as patch:
            if distributed["strategy"] == "deepspeed":
                # as accelerate's launch_command does: DeepSpeedPlugin refuses these next to a JSON file
                fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
                args.deepspeed_fields_from_accelerate_config = ",".join(fields)
                cmd, env = prepare_deepspeed_cmd_env(args)
                assert cmd is None, cmd  # each machine starts its own processes; no pdsh/ssh to the others
                for key, value in env.items():
                    patch.setenv(key, value)
                plugin = DeepSpeedPlugin()
                assert plugin.zero_stage == (2 if name == "zero2" else 3), name
                if name == "zero3-2-machines":
                    assert (args.nnodes, args.node_rank, args.rdzv_endpoint) == ("2", 1, "10.0.0.1:29500")
                assert plugin.deepspeed_config["zero_optimization"].get("offload_optimizer"), name
            else:
                env = prepare_multi_gpu_env(args)
                for key, value in env.items():
                    patch.setenv(key, value)
                if name != "ddp":
                    fsdp = FullyShardedDataParallelPlugin()
                    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward == (name == "fsdp"), name
                else:
                    assert env.get("ACCELERATE_USE_FSDP") is None and env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_multi_node_layout_reaches_the_accelerate_config(tmp_path):
    from finetune.launch.launcher import prepare_launch

    distributed = {"strategy": "ddp", "num_processes": 2, "num_machines": 3, "machine_rank": 1,
                   "main_address": "10.1.2.3", "main_port": 29600, "rdzv_backend": "c10d"}
    plan = prepare_launch(load_recipe(write_recipe(tmp_path, distributed=distributed)), GPU_BOX)
    acc = yaml.safe_load(next(text for file, text in plan.files.items() if file.suffix == ".yaml"))
    assert {k: acc[k] for k in ("num_processes", "num_machines", "machine_rank", "main_process_ip",
                                "main_process_port")} == {
        "num_processes": 6, "num_machines": 3, "machine_rank": 1, "main_process_ip": "10.1.2.3",
        "main_process_port": 29600}
    assert "machine 1 of 3" in plan.summary and "6 in all" in plan.summary
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    for file, text in plan.files.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(plan.argv[3:]))
    prepare_multi_gpu_env(args)  # what accelerate hands to torchrun
    assert (args.rdzv_backend, args.rdzv_endpoint, args.nnodes, args.node_rank, args.nproc_per_node) == (
        "c10d", "10.1.2.3:29600", "3", 1, "2")


def test_launcher_settings_and_trainer_arguments_stay_apart(tmp_path):
    """Changing `distributed` leaves the trainer's arguments alone, and changing `training` the launch files."""
    from finetune.launch.launcher import prepare_launch
    from finetune.model.load import resolve_precision
    from finetune.train.trainers import training_args

    ds = {"strategy": "deepspeed", "zero_stage": 2, "num_processes": 2}
    a = load_recipe(write_recipe(tmp_path, "a", distributed=ds)).recipe
    b = load_recipe(write_recipe(tmp_path, "a", distributed={"strategy": "none"})).recipe
    args = [training_args(r, resolve_precision(r), tmp_path, False) for r in (a, b)]
    assert args[0] == args[1]
    training = {"micro_batch_size": 2, "learning_rate": 1e-3, "gradient_accumulation_steps": 4, "max_length": 64}
    plans = [
        prepare_launch(load_recipe(write_recipe(tmp_path, "a", distributed=ds, **extra)), CPU_BOX)
        for extra in ({}, {"training": training})
    ]
    assert plans[0].files == plans[1].files and plans[0].argv == plans[1].argv


def test_worker_takes_only_the_resolved_recipe(capsys):
    from finetune.launch.worker import main

    with pytest.raises(SystemExit) as info:
        main(["runs/x/recipe.yaml", "--num_processes", "4"])
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_distributed_recipe_is_not_trained_in_process(tmp_path):
    from finetune.train.run import run_training

    path = write_recipe(tmp_path, distributed={"strategy": "ddp", "num_processes": 2})
    with pytest.raises(UserError, match="starts several processes; run it with `finetune train`"):
        run_training(load_recipe(path))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "distributed, message",
    [
        ({"strategy": "none", "num_processes": 2}, "distributed.strategy: is 'none' (one process)"),
        ({"strategy": "deepspeed", "num_processes": 2}, "distributed.zero_stage: strategy deepspeed needs zero_stage"),
        ({"strategy": "deepspeed", "zero_stage": 2, "config": "zero3"},
         "distributed.config: names a file that decides the ZeRO/FSDP settings; remove zero_stage, or config"),
        ({"strategy": "deepspeed", "zero_stage": 2, "offload_params": True},
         "distributed.offload_params: DeepSpeed offloads parameters only at zero_stage 3"),
        ({"strategy": "fsdp", "fsdp_min_params": 10}, "fsdp_min_params: applies only with fsdp_auto_wrap: size"),
    ],
)
def test_section_rules_are_caught_by_validate(tmp_path, distributed, message):
    with pytest.raises(UserError) as info:
        load_recipe(write_recipe(tmp_path, distributed=distributed))
    assert any(message in p for p in info.value.problems), info.value.problems


# --- the launch rules, through the CLI: exit 2, the reason and the fix, nothing started or written ------------


def refused(tmp_path: Path, *argv: str, hide_deepspeed: bool = False) -> str:
    """Run `finetune ARGV` in a fresh process; assert exit 2, no traceback, no run directory; return stderr."""
    if hide_deepspeed:  # DeepSpeed is a dev dependency; hiding it is the only way to see a machine without it
        code = ("import sys; sys.modules['deepspeed'] = None; from finetune.cli import main; "
                f"sys.argv = ['finetune', *{list(argv)!r}]; main()")
        import subprocess

        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                                env=os.environ.copy())
    else:
        result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "nothing was started" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()
    return result.stderr


def test_rules_refuse_deepspeed_missing_qlora_zero3_too_many_processes_and_ignored_optimizer(tmp_path):
    pytest.importorskip("bitsandbytes")  # _preflight asks for it before the launch rules
    cores = len(os.sched_getaffinity(0))
    path = write_recipe(
        tmp_path,
        adapter={"kind": "qlora"},
        training={"optimizer": "sgd"},
        distributed={"strategy": "deepspeed", "config": "zero3-offload", "num_processes": cores + 1},
    )
    err = refused(tmp_path, "train", str(path), hide_deepspeed=True)
    assert "4 problems with this launch; nothing was started" in err
    assert "distributed.strategy: strategy 'deepspeed' needs the deepspeed package" in err
    assert "Fix: pip install 'finetune-recipes[deepspeed]'" in err
    assert f"distributed.num_processes: {cores + 1} CPU processes, but this machine has {cores} core(s)" in err
    assert f"Fix: set num_processes to at most {cores}" in err
    assert "training.optimizer: the DeepSpeed config builds its own optimizer (AdamW" in err
    assert "adapter.quant_storage: QLoRA under DeepSpeed ZeRO-3 shards the packed 4-bit weights" in err
    assert "Fix: set adapter.quant_storage and model.dtype to the same float dtype" in err
    assert f"{path}:" in err  # problems point at the recipe's lines


def test_rules_refuse_fsdp_and_auto_without_gpus(tmp_path):
    path = write_recipe(tmp_path, distributed={"strategy": "fsdp"})
    err = refused(tmp_path, "train", str(path))
    assert "distributed.strategy: FSDP through accelerate and the Trainer needs GPUs" in err
    assert "Fix: run on a GPU machine, or use strategy: ddp or deepspeed" in err
    assert "distributed.num_processes: 'auto' starts one process per GPU and this machine has none" in err


def test_rules_refuse_deepspeed_batch_sizes_that_do_not_divide(tmp_path):
    ds = deepspeed_config(2) | {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 3, "gradient_clipping": 0.5}
    (tmp_path / "mine.json").write_text(json.dumps(ds))
    path = write_recipe(tmp_path, distributed={"strategy": "deepspeed", "config": str(tmp_path / "mine.json"),
                                               "num_processes": 2})
    err = refused(tmp_path, "launch-plan", str(path))
    assert "training.micro_batch_size: the DeepSpeed config fixes train_micro_batch_size_per_gpu 3 (recipe: 4), " \
           "train_batch_size 12 (recipe: 8)" in err
    assert 'Fix: set those keys to "auto" in the DeepSpeed JSON' in err
    assert "distributed.config: the DeepSpeed config fixes gradient_clipping 0.5 (training.max_grad_norm: 1.0)" in err


def test_rules_refuse_unknown_mismatched_and_contradicting_config_files(tmp_path):
    from finetune.launch.launcher import prepare_launch

    def problems(distributed: dict) -> str:
        with pytest.raises(UserError, match="nothing was (started|written)") as info:
            prepare_launch(load_recipe(write_recipe(tmp_path, distributed=distributed)), CPU_BOX)
        return "\n".join(info.value.problems)

    assert "distributed.config: no shipped config named 'zero4' (did you mean 'zero3'?) and no such file; shipped: " \
           "fsdp2-full-shard, fsdp2-shard-grad-op, zero1, zero2, zero3, zero3-offload" in problems(
        {"strategy": "deepspeed", "config": "zero4", "num_processes": 2})
    assert "zero3.json is a config for deepspeed, but strategy is 'ddp'" in problems(
        {"strategy": "ddp", "config": "zero3", "num_processes": 2})
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 8, "mixed_precision": "bf16"}))
    assert "sets num_processes: 8 (recipe: 2), mixed_precision: 'bf16' (recipe: 'no')" in problems(
        {"strategy": "ddp", "config": str(mine), "num_processes": 2})


def test_rule_refuses_more_processes_than_gpus(tmp_path):
    from finetune.launch.launcher import prepare_launch

    with pytest.raises(UserError) as info:
        prepare_launch(load_recipe(write_recipe(tmp_path, distributed={"strategy": "ddp", "num_processes": 4})),
                       GPU_BOX)
    (problem,) = info.value.problems
    assert "distributed.num_processes: 4 processes per machine, but 2 GPU(s) are visible" in problem
    assert "Fix: set num_processes to at most 2 (or auto)" in problem


def test_launch_plan_prints_command_environment_and_files(tmp_path):
    path = write_recipe(tmp_path, distributed={"strategy": "deepspeed", "zero_stage": 3, "num_processes": 2})
    result = run_cli("launch-plan", str(path), "--set", "distributed.main_port=29777", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    run_dir = (tmp_path / "runs" / "r").resolve()
    assert "# nothing started" in out and "DS_ACCELERATOR=cpu" in out
    assert f"accelerate.commands.launch --config_file {run_dir}/accelerate_config.yaml -m finetune.launch.worker" in out
    assert f"# --- {run_dir}/deepspeed.json" in out and '"stage": 3' in out and "main_process_port: 29777" in out
    assert not (tmp_path / "runs").exists()
    single = run_cli("launch-plan", str(REPO / "recipes/tiny/sft_lora.yaml"))
    assert single.returncode == 0 and "one process" in single.stdout


def test_launch_plan_plans_more_processes_than_this_machine_has_cores_and_warns(tmp_path):
    from finetune.launch.launcher import describe_launch, prepare_launch

    distributed = {"strategy": "ddp", "num_processes": 8}
    loaded = load_recipe(write_recipe(tmp_path, distributed=distributed, training={"precision": "bf16"}))
    text = describe_launch(loaded, CPU_BOX)  # a 2-core login node planning for 8 GPUs elsewhere
    assert "8 process(es) on this machine" in text
    assert "# warning (this machine; the machines that run it may differ)" in text and "2 core(s)" in text
    with pytest.raises(UserError, match="'bf16' needs a CUDA GPU"):
        prepare_launch(loaded, CPU_BOX)  # `finetune train` here still refuses
    with pytest.raises(UserError) as refused:
        prepare_launch(load_recipe(write_recipe(tmp_path, "fp32", distributed=distributed)), CPU_BOX)
    assert "8 CPU processes, but this machine has 2 core" in refused.value.render()
    assert not (tmp_path / "runs").exists()
