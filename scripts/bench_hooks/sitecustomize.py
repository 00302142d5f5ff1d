"""Step timing for the peers of scripts/bench_train.py (axolotl, LLaMA-Factory): on their PYTHONPATH only.

When BENCH_METRICS names a file, every logged training step of any transformers `Trainer` in the process
appends {"step", "time", "cpu_seconds", "loss", "num_tokens", "num_trained_tokens", "num_input_tokens"}
to it, the same record finetune's metrics.jsonl and the TRL baseline write, so one reader serves all
tools. Tokens are counted from each batch as the Trainer receives it: real = non-padding positions,
trained = labels that carry loss, input = every position. Nothing is imported until the tool itself
imports transformers.trainer, so the tool's start-up time is its own.
"""

import importlib.abc
import importlib.util
import json
import os
import sys
import time

_PATH = os.environ.get("BENCH_METRICS")


def _patch(trainer_cls) -> None:
    counts = {"num_tokens": 0, "num_trained_tokens": 0, "num_input_tokens": 0}
    step = trainer_cls.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        # axolotl's packed batches number the sequences in attention_mask (1, 2, 3...): count non-zeros
        real = int((mask != 0).sum()) if mask is not None and mask.dim() == 2 else ids.numel()
        counts["num_tokens"] += real
        counts["num_input_tokens"] += ids.numel()
        if inputs.get("labels") is not None:
            counts["num_trained_tokens"] += int((inputs["labels"][..., 1:] != -100).sum())
        return step(self, model, inputs, *args, **kwargs)

    log = trainer_cls.log

    def logged(self, logs, *args, **kwargs):
        if "loss" in logs and self.model.training:
            record = {"step": self.state.global_step, "time": time.time(), "cpu_seconds": time.process_time(),
                      "loss": logs["loss"], **counts}
            with open(_PATH, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        return log(self, logs, *args, **kwargs)

    trainer_cls.training_step = training_step
    trainer_cls.log = logged


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module.Trainer)

        spec.loader.exec_module = exec_module
        return spec


if _PATH:
    sys.meta_path.insert(0, _PatchOnImport())
