"""Measure how far a GGUF export's logits are from the model it came from, per quant type.

    python scripts/gguf_roundtrip.py runs/tiny-sft-lora/merged

Writes each quant type to a temporary file, reads it back with transformers' GGUF loader (an
independent reader) and prints max/mean abs logit difference and greedy-token agreement on the
merge verification prompts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.export.gguf_writer import QUANTS, write_gguf
from finetune.merge.bake import VERIFY_PROMPTS


def main(model_dir: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in VERIFY_PROMPTS]
    print("| quant | file MiB | max abs logit diff | mean abs logit diff | same argmax |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for quant in QUANTS:
            path = write_gguf(model_dir, Path(tmp) / f"m-{quant}.gguf", quant=quant).path
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name).eval()
            diffs, same, total = [], 0, 0
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
                with torch.no_grad():
                    a, b = reference(ids).logits, model(ids).logits
                diffs.append((a - b).abs())
                same += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += ids.shape[1]
            flat = torch.cat([d.flatten() for d in diffs])
            size = path.stat().st_size / 2**20
            print(f"| {quant} | {size:.2f} | {flat.max():.2e} | {flat.mean():.2e} | {same}/{total} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
