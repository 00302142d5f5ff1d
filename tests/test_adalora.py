"""AdaLoRA at the edges: resume lands where an uninterrupted run lands; the penalty counts once on every LM-head path.

A 10-step run prunes ranks from init_r 4 to an average of 2 between steps 2 and 8 (warm-up 0.2, final 0.2), so
a checkpoint at step 4 sits in the middle of the rank allocation: its importance averages decide the masks that
follow. Before checkpoints kept them, `--resume` crashed (PEFT loads the pruned adapter into the full-rank
modules training keeps), and the penalty was added twice when the model computed its own loss.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from finetune.recipe import load_recipe
from finetune.run.checkpoints import LATEST
from tests.test_train import make_recipe

pytestmark = pytest.mark.slow

ADALORA = {"kind": "adalora", "init_r": 4, "target_r": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
           "rank_warmup_ratio": 0.2, "rank_final_ratio": 0.2, "orth_reg_weight": 0.5}
TRAINING = {"max_steps": 10, "micro_batch_size": 4, "max_length": 96, "save_steps": 4, "lm_head": "full_logits"}


def run(tmp_path: Path, name: str, callbacks=(), resume=None, **training):
    from finetune.train.run import run_training

    path = make_recipe(tmp_path, name, adapter=ADALORA, training={**TRAINING, **training})
    return run_training(load_recipe(path), log=lambda _: None, callbacks=callbacks, resume=resume)


def adapter_state(run_dir: Path):
    from safetensors.torch import load_file

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    return load_file(run_dir / "adapter" / "adapter_model.safetensors"), config["rank_pattern"]


def assert_same_adapter(run_dir: Path, reference: Path, atol: float = 1e-6) -> None:
    import torch

    (got, got_ranks), (want, want_ranks) = adapter_state(run_dir), adapter_state(reference)
    assert got_ranks == want_ranks
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=1e-5, msg=key)


def sigint_at(step: int):
    """A callback that sends this process SIGINT (as Ctrl-C does) when a step ends."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGINT)

    return Interrupt()


def test_resume_mid_rank_allocation_lands_where_the_uninterrupted_run_lands(tmp_path, torch_one_thread):
    from finetune.train.interrupt import RunInterrupted

    reference = run(tmp_path, "reference")
    with pytest.raises(RunInterrupted, match="stopped at step 4/10"):  # the signal is seen when the next step ends
        run(tmp_path, "interrupted", callbacks=(sigint_at(3),))
    checkpoint = tmp_path / "runs/interrupted/checkpoints/checkpoint-4"
    assert (checkpoint / "adalora_state.pt").is_file()
    resumed = run(tmp_path, "interrupted", resume=LATEST)
    assert_same_adapter(resumed, reference)
    ranks = [sum(r) for r in adapter_state(resumed)[1].values()]
    assert sum(ranks) <= 2 * len(ranks) < 4 * len(ranks)  # pruned: the allocation did run across the resume


def test_the_penalty_counts_once_whichever_lm_head_computes_the_loss(tmp_path, torch_one_thread):
    # full_logits: the model computes its loss (PEFT added the penalty there, and the callback again);
    # chunked: TRL computes it outside the model. The same run must come out either way.
    full = run(tmp_path, "full", max_steps=3, save_steps=None, lm_head="full_logits")
    chunked = run(tmp_path, "chunked", max_steps=3, save_steps=None, lm_head="chunked")
    assert_same_adapter(chunked, full, atol=1e-5)


def test_adalora_under_deepspeed_or_fsdp_is_refused_before_launch(tmp_path):
    from finetune.errors import UserError
    from finetune.launch.rules import Context, Machine, check_launch

    machine = Machine(gpus=2, cpus=4, deepspeed_installed=True)
    for distributed in ({"strategy": "deepspeed", "zero_stage": 3, "num_processes": 2},
                        {"strategy": "deepspeed", "zero_stage": 2, "num_processes": 2},
                        {"strategy": "fsdp", "num_processes": 2}):
        path = make_recipe(tmp_path, "zero", adapter=ADALORA, distributed=distributed)
        with pytest.raises(UserError) as info:
            check_launch(Context(load_recipe(path).recipe, machine))
        assert "adapter.kind: AdaLoRA's rank allocation" in info.value.render()
        assert "use distributed.strategy: ddp" in info.value.render()
    ddp = make_recipe(tmp_path, "ddp", adapter=ADALORA, distributed={"strategy": "ddp", "num_processes": 2})
    check_launch(Context(load_recipe(ddp).recipe, machine))
