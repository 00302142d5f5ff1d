"""llama.cpp itself, in this process (the `xllamacpp` wheel): load a GGUF, generate with log-probs.

A GGUF is proven by the program that consumes it, not by reading it back with our own
assumptions: this is how the export checks its file and how the tests compare llama.cpp with
transformers. `xllamacpp` wraps llama.cpp's server; one request is one `/completion` call.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

INSTALL_HINT = "pip install 'finetune-recipes[gguf]' (llama.cpp's prebuilt wheel, xllamacpp)"


def available() -> bool:
    """Whether llama.cpp (xllamacpp) can be imported here."""
    import importlib.util

    return importlib.util.find_spec("xllamacpp") is not None


@dataclass
class Completion:
    """Greedy tokens llama.cpp generated, each with its log-probability, and the prompt's length in tokens."""

    tokens: list[int]
    logprobs: list[float]
    text: str
    prompt_tokens: int


@contextlib.contextmanager
def _stderr_captured():
    """Send file descriptor 2 (where llama.cpp logs) to a temporary file; yields a reader of what was logged."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class LlamaCpp:
    """One GGUF loaded in llama.cpp (CPU, no warm-up), ready for greedy completions."""

    def __init__(self, path: Path, *, n_ctx: int = 512, threads: int = 1):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.warmup = False
        params.n_gpu_layers = 0  # the CPU, as the comparison with transformers runs there
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.verbosity = 1  # errors only: llama.cpp's reason for refusing a file, and nothing on success
        with _stderr_captured() as logged:
            try:
                self.server = xllamacpp.Server(params)
            except RuntimeError:
                time.sleep(0.2)  # llama.cpp logs from a worker thread
                reasons = [line.split(" E ", 1)[-1].strip() for line in logged().splitlines() if " E " in line]
                raise UserError(
                    f"{path}: llama.cpp refuses this file: " + ("; ".join(reasons[:2]) or "no reason logged")
                ) from None

    def complete(self, prompt: str | list[int], n_predict: int) -> Completion:
        """Greedy continuation of `prompt` (text, tokenised by llama.cpp, or token ids) with per-token log-probs."""
        request = {
            "prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "n_probs": 1,
            "cache_prompt": False,
        }
        response = self.server.handle_completions(request)
        if "choices" not in response:
            raise UserError(f"llama.cpp could not complete the prompt: {response.get('message') or response}")
        choice = response["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        return Completion(
            tokens=[step["id"] for step in content],
            logprobs=[step["logprob"] for step in content],
            text=choice["text"],
            prompt_tokens=response["usage"]["prompt_tokens"],
        )


def check_tokenization(llama: LlamaCpp, tokenizer, text: str) -> None:
    """llama.cpp must cut `text` into the tokens transformers does: a different pre-tokenizer, vocabulary type or
    BOS setting shows up as another prompt length or another continuation of the same text."""
    ids = tokenizer(text).input_ids
    from_text, from_ids = llama.complete(text, 2), llama.complete(ids, 2)
    if from_text.prompt_tokens != len(ids) or from_text.tokens != from_ids.tokens:
        raise UserError(
            f"llama.cpp tokenises {text[:40]!r}... into {from_text.prompt_tokens} tokens, transformers into "
            f"{len(ids)}; the GGUF's tokenizer metadata does not match the model's tokenizer"
        )


@dataclass
class Comparison:
    """llama.cpp against transformers on the same tokens (see `compare_with_transformers`)."""

    positions: int  # generated tokens compared
    same_top: int  # positions where transformers' most likely token is the one llama.cpp chose
    max_logprob_diff: float
    mean_logprob_diff: float


def compare_with_transformers(path: Path, model_dir: Path, prompts: list[str], *, n_predict: int = 16,
                              model=None) -> Comparison:
    """Generate greedily in llama.cpp, then score the same tokens with transformers (teacher forcing).

    Each prompt is tokenised by transformers and given to llama.cpp as ids, and also as text
    (which must give the same tokens: `check_tokenization`). Compared per generated token: the
    log-probability of llama.cpp's token under both, and whether it is transformers' top token.
    `model` is the transformers model of `model_dir` if the caller already holds it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llama = LlamaCpp(path)
    diffs, same = [], 0
    for text in prompts:
        check_tokenization(llama, tokenizer, text)
        ids = tokenizer(text).input_ids
        done = llama.complete(ids, n_predict)
        with torch.no_grad():
            logits = model(torch.tensor([ids + done.tokens[:-1]])).logits[0, len(ids) - 1 :].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = torch.tensor(done.tokens)
        ours = logprobs[torch.arange(len(chosen)), chosen]
        diffs += (ours - torch.tensor(done.logprobs)).abs().tolist()
        same += int((logprobs.argmax(-1) == chosen).sum())
    return Comparison(len(diffs), same, max(diffs), sum(diffs) / len(diffs))
