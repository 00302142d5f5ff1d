"""Are QLoRA's LoRA gradients right on this machine's bitsandbytes? Measured against the dequantised model.

Loads builtin:tiny-llama in 4-bit the way training does (finetune.model.load.load_model, the tests' QLoRA
recipe), puts the recipe's LoRA adapter on it (B made nonzero), and prints the largest difference between its
LoRA gradients and those of the same model with every 4-bit layer replaced by its dequantised fp32 weight:
on a fresh model, and after one evaluation pass (eval mode, forward without grad), with finetune's guard
(keep_4bit_training_kernel) and with bitsandbytes' default, for a batch and for a single token.

    cpujob python scripts/qlora_grads.py

Results (with the date and versions) are in docs/testing.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def measure(tmp: Path, shape: tuple[int, int], guard: bool) -> dict:
    """One model: LoRA grads before and after an eval pass against the dequantised reference."""
    from tests.test_qlora_grads import (
        bitsandbytes_default,
        dequantised_copy,
        eval_pass,
        gemv_warnings,
        lora_grads,
        max_abs_diff,
        qlora_model,
        token_ids,
    )

    model = qlora_model(tmp)
    if not guard:
        bitsandbytes_default(model)
    ids = token_ids(model, *shape)
    reference = lora_grads(dequantised_copy(model), ids)
    fresh = max_abs_diff(lora_grads(model, ids), reference)
    eval_pass(model, token_ids(model, 2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = lora_grads(model, ids)
    off = [n for n in reference if (after[n] - reference[n]).norm() > 0.01 * reference[n].norm()]
    return {"fresh": fresh, "after_eval": max_abs_diff(after, reference),
            "largest_grad": max(g.abs().max().item() for g in reference.values()),
            "gemv_warnings": len(gemv_warnings(caught)), "off": f"{len(off)} of {len(reference)}"}


def main() -> None:
    import bitsandbytes
    import torch
    from bitsandbytes.functional import has_avx512bf16

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, AVX512-BF16: {has_avx512bf16()}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FINETUNE_CACHE", str(Path(tmp) / "cache"))
        for guard in (True, False):
            for shape in ((2, 16), (1, 1)):
                r = measure(Path(tmp), shape, guard)
                print(f"{'finetune guard' if guard else 'bitsandbytes default'}, input {shape[0]}x{shape[1]}: "
                      f"max abs diff fresh {r['fresh']:.2e}, after an eval pass {r['after_eval']:.2e} "
                      f"(largest grad {r['largest_grad']:.2e}; off by over 1% of their norm: {r['off']} tensors); "
                      f"gemv_4bit warnings in that backward: {r['gemv_warnings']}")


if __name__ == "__main__":
    main()
