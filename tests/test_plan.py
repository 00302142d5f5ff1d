"""`finetune plan`: a memory estimate from config.json alone, its verdicts, and its calibration on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe.load import recipe_from_dict
from finetune.train.memory import GiB, ModelShape, Sharding, estimate, parse_size, read_shape, sharding_from_recipe
from tests.conftest import REPO, invoke_cli, run_cli

QLORA_7B = str(REPO / "recipes/7b/qlora.yaml")


def test_llama_7b_config_gives_llama_2_7b_parameter_count():
    shape = read_shape(REPO / "configs/models/llama-7b/config.json")
    assert shape.params == 6_738_415_616  # Llama-2-7B's published count


@pytest.mark.parametrize("memory, verdict, code", [("24GiB", "FITS", 0), ("80GiB", "FITS", 0),
                                                   ("6GiB", "DOES NOT FIT", 1)])
def test_plan_7b_qlora_prints_a_breakdown_and_a_verdict(memory, verdict, code):
    result = run_cli("plan", QLORA_7B, "--gpu-memory", memory, cwd=REPO)
    assert result.returncode == code, result.stderr
    out = result.stdout
    for part in ("| weights |", "| adapter |", "| gradients |", "| optimizer |", "| activations |", "| **total** |"):
        assert part in out, out
    assert "4-bit nf4" in out and f"{verdict}:" in out and "largest micro batch that fits:" in out


def test_plan_imports_no_ml_stack(tmp_path):
    code = (
        "import sys\n"
        f"sys.argv = ['finetune', 'plan', {QLORA_7B!r}, '--gpu-memory', '24GiB']\n"
        "from finetune.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


def test_plan_of_an_unreachable_hub_model_says_so(tmp_path):
    recipe = yaml.safe_load(Path(QLORA_7B).read_text())
    recipe["model"]["path"] = "meta-llama/Llama-2-7b-hf"
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    result = subprocess.run([sys.executable, "-m", "finetune", "plan", str(path), "--gpu-memory", "24GiB"],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "it can only come from the local Hub cache" in result.stderr and "local directory" in result.stderr


def recipe(adapter: dict, **training):
    return recipe_from_dict({
        "model": {"path": "x"}, "data": {"train": [{"path": "x"}]}, "method": {"kind": "sft"},
        "adapter": adapter, "training": {"batching": "padded", **training},
    })


SHAPE_7B = read_shape(REPO / "configs/models/llama-7b/config.json")
LORA = {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0}


def parts(est) -> dict[str, float]:
    return {p.name: p.bytes for p in est.parts}


def test_estimate_parts_follow_dtype_quantisation_sharding_and_checkpointing():
    full = parts(estimate(recipe({"kind": "full"}), SHAPE_7B, device="cuda"))
    assert full["weights"] == pytest.approx(SHAPE_7B.params * 4)  # float32 masters under bf16 autocast
    assert full["gradients"] == pytest.approx(SHAPE_7B.params * 4)
    assert full["optimizer"] == pytest.approx(2 * full["gradients"])  # AdamW: two float32 states per gradient
    pure = parts(estimate(recipe({"kind": "full"}, fp32_master_weights=False), SHAPE_7B, device="cuda"))
    assert pure["weights"] == pytest.approx(full["weights"] / 2) and pure["optimizer"] == pytest.approx(
        full["optimizer"] / 2)
    qlora = parts(estimate(recipe({**LORA, "kind": "qlora"}), SHAPE_7B, device="cuda"))
    assert 3.3 * GiB < qlora["weights"] < 4.0 * GiB  # 4-bit linears, bf16 embeddings and head
    sharded = parts(estimate(recipe({"kind": "full"}), SHAPE_7B, device="cuda", sharding=Sharding(8, 3)))
    assert sharded["weights"] == pytest.approx(SHAPE_7B.params * 2 / 8)  # DeepSpeed's 16-bit weights, sharded
    assert sharded["optimizer"] == pytest.approx(SHAPE_7B.params * 12 / 8)  # float32 masters + AdamW, sharded
    stage1 = parts(estimate(recipe({"kind": "full"}), SHAPE_7B, device="cuda", sharding=Sharding(8, 1)))
    assert stage1["weights"] == pytest.approx(SHAPE_7B.params * 2)
    assert stage1["optimizer"] == pytest.approx(sharded["optimizer"])
    on = estimate(recipe(LORA, gradient_checkpointing=True), SHAPE_7B, device="cuda")
    off = estimate(recipe(LORA), SHAPE_7B, device="cuda")
    assert parts(on)["activations"] < parts(off)["activations"] / 5
    bigger = estimate(recipe(LORA, micro_batch_size=8), SHAPE_7B, device="cuda")
    assert parts(bigger)["activations"] == pytest.approx(2 * parts(off)["activations"], rel=0.05)


MODEL_STATES = ("weights", "adapter", "gradients", "optimizer", "gathered layers")


@pytest.mark.parametrize("stage, gpus", [(2, 1), (2, 8), (3, 1), (3, 8), (3, 64)])
def test_zero_model_states_agree_with_deepspeeds_estimator(stage, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    full = recipe_from_dict({
        "model": {"path": "x"}, "data": {"train": [{"path": "x"}]}, "method": {"kind": "sft"},
        "adapter": {"kind": "full"}, "training": {"precision": "bf16"},
        "distributed": {"strategy": "deepspeed", "zero_stage": stage, "num_processes": gpus},
    })  # fmt: skip
    est = estimate(full, SHAPE_7B, device="cuda", sharding=sharding_from_recipe(full, None, None))
    ours = sum(b for name, b in parts(est).items() if name in MODEL_STATES)
    params, largest = SHAPE_7B.params, SHAPE_7B.vocab * SHAPE_7B.hidden  # the embedding is the largest layer
    if stage == 2:
        _, theirs = estimate_zero2_model_states_mem_needs(params, gpus, 1, cpu_offload=False)
    else:
        _, theirs, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus, 1, cpu_offload=False,
                                                             cpu_offload_params=False)
    assert 0.9 * theirs <= ours <= 1.1 * theirs, (ours / GiB, theirs / GiB)


def test_full_7b_on_one_80gb_gpu_does_not_fit_and_orpo_counts_both_answers():
    plan = estimate(recipe({"kind": "full"}), SHAPE_7B, device="cuda")
    assert plan.total > 100 * GiB  # was planned at 50 GiB "FITS": bf16 weights and states, no float32 masters
    def activations(kind):
        sft = recipe(LORA)
        pair = recipe_from_dict({
            "model": {"path": "x"}, "data": {"train": [{"path": "x", "format": "preference"}]},
            "method": {"kind": kind}, "adapter": LORA,
        })  # fmt: skip
        return parts(estimate(pair, SHAPE_7B, device="cuda"))["activations"], parts(
            estimate(sft, SHAPE_7B, device="cuda"))["activations"]

    for kind in ("dpo", "orpo"):
        pair, single = activations(kind)
        assert pair > 1.8 * single, kind  # chosen and rejected rows run together


def test_sizes_parse():
    assert parse_size("24GiB") == parse_size("24GB") == parse_size("24g") == 24 * GiB
    assert parse_size("512MiB") == 512 * 2**20
    with pytest.raises(UserError, match="--gpu-memory"):
        parse_size("lots")


def test_train_refuses_a_plan_that_cannot_fit_before_writing_anything(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(REPO / "configs/models/llama-7b")},  # config only: refused before any load
        "data": {"train": [{"path": "builtin:sample_chat.jsonl"}]},
        "method": {"kind": "sft"},
        "training": {"micro_batch_size": 100_000, "max_length": 1024, "max_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }))
    result = invoke_cli("train", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "memory plan does not fit" in result.stderr and "--ignore-memory-plan" in result.stderr
    assert not (tmp_path / "run").exists()


# Tiny Llama-shaped models trained for two steps on the CPU (fp32, full-length rows); see docs/memory.md.
CALIBRATION = [
    {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 688, "vocab": 8192,
     "adapter": "lora", "r": 16, "dropout": 0.05, "checkpointing": False, "batch": 8, "length": 512},
    {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 688, "vocab": 8192,
     "adapter": "lora", "r": 16, "dropout": 0.05, "checkpointing": True, "batch": 8, "length": 512},
    {"hidden": 384, "layers": 6, "heads": 6, "kv_heads": 2, "intermediate": 1024, "vocab": 4096,
     "adapter": "full", "r": 0, "dropout": 0.0, "checkpointing": False, "batch": 4, "length": 256},
]
BAND = (0.7, 1.25)  # measured peak ÷ estimate


@pytest.mark.slow
def test_estimate_holds_within_band_of_measured_cpu_peaks():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "tests/memory_probe.py"), json.dumps(CALIBRATION)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(CALIBRATION)
    ratios = []
    for case in results:
        shape = ModelShape("llama", case["hidden"], case["layers"], case["heads"], case["kv_heads"],
                           case["hidden"] // case["heads"], case["intermediate"], case["vocab"], False, None)
        adapter = {"kind": "full"} if case["adapter"] == "full" else {
            "kind": "lora", "r": case["r"], "alpha": 2 * case["r"], "dropout": case["dropout"]}
        est = estimate(recipe(adapter, micro_batch_size=case["batch"], max_length=case["length"],
                              gradient_checkpointing=case["checkpointing"]), shape, device="cpu")
        ratios.append(case["peak_bytes"] / est.total)
    assert all(BAND[0] <= r <= BAND[1] for r in ratios), ratios
