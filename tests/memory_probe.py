"""Measure the peak memory of a training step on the CPU, for tests/test_plan.py's calibration.

Run as a subprocess: `python tests/memory_probe.py '<json list of cases>'`; prints one JSON line per case with
the peak RSS increase over the process's RSS before the model was built. Each case builds a random Llama-shaped
model in fp32, adds LoRA (or trains it fully) with PEFT, and takes two AdamW steps on full-length rows with the
model's own loss, which is what `finetune train` does on a CPU (lm_head: full_logits).

MALLOC_MMAP_THRESHOLD_ should be set (the test sets it) so that freed tensors go back to the system and the
peak RSS of one case does not hide inside memory kept from the previous one.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def run_case(case: dict) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    _reset_peak()
    before = _status("VmRSS")
    config = LlamaConfig(vocab_size=case["vocab"], hidden_size=case["hidden"], intermediate_size=case["intermediate"],
                         num_hidden_layers=case["layers"], num_attention_heads=case["heads"],
                         num_key_value_heads=case["kv_heads"], max_position_embeddings=4096,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if case["adapter"] == "lora":
        model = get_peft_model(model, LoraConfig(r=case["r"], lora_alpha=2 * case["r"], lora_dropout=case["dropout"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    if case["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if case["adapter"] == "lora":
            model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, length = case["batch"], case["length"]
    for _ in range(2):
        ids = torch.randint(8, case["vocab"], (batch, length))
        labels = ids.clone()
        labels[:, : length // 3] = -100
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _status("VmHWM") - before
    del model, optimizer, loss
    return peak


def main() -> None:
    import torch

    torch.set_num_threads(1)
    for case in json.loads(sys.argv[1]):
        print(json.dumps({**case, "peak_bytes": run_case(case)}), flush=True)


if __name__ == "__main__":
    main()
