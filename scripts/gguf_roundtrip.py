"""Measure llama.cpp against transformers on GGUF exports, per architecture and output type.

    python scripts/gguf_roundtrip.py              # the five tiny models of tests/test_gguf.py, built offline
    python scripts/gguf_roundtrip.py DIR [DIR...]  # merged or full model directories

Each model is written in every output type and loaded in llama.cpp itself (xllamacpp). On the
prompts of tests/test_gguf.py llama.cpp generates greedily; transformers (fp32) then scores the
same tokens. Printed per file: tokens compared, how many are transformers' top token, and the
worst and mean |log p| difference. The tests' limits (LOGPROB_LIMIT) come from this table.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.export.gguf_writer import QUANTS, write_gguf  # noqa: E402
from finetune.export.llama_cpp import compare_with_transformers  # noqa: E402
from tests.test_gguf import build_models, prompts, register_tiny_qwen2  # noqa: E402


def main(dirs: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if dirs:
            models = {Path(d).name: Path(d) for d in dirs}
        else:
            models = build_models(Path(tmp) / "models")
            table, digest, entry = register_tiny_qwen2(models["qwen2"])
            table[digest] = entry
        print("| model | tokenizer | type | MiB | tokens | same top token | max abs log-prob diff | mean |")
        print("|---|---|---|---|---|---|---|---|")
        for name, model_dir in models.items():
            for quant in QUANTS:
                written = write_gguf(model_dir, Path(tmp) / f"{name}-{quant}.gguf", quant=quant)
                result = compare_with_transformers(written.path, model_dir, prompts(model_dir), n_predict=12)
                size = written.path.stat().st_size / 2**20
                print(f"| {name} ({written.architecture}) | {written.vocab.model}/{written.vocab.pre} | {quant} | "
                      f"{size:.2f} | {result.positions} | {result.same_top}/{result.positions} | "
                      f"{result.max_logprob_diff:.1e} | {result.mean_logprob_diff:.1e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
