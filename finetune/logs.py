"""What the user sees on the terminal: our own lines on stderr, library chatter kept quiet."""

from __future__ import annotations

import logging
import sys

# Library lines about how *we* call the library, which the user can neither act on nor avoid:
# logger name -> the start of each message dropped from it. Everything else they log stays.
UNACTIONABLE = {
    # DeepSpeed guesses its accelerator when it is imported (transformers and accelerate import it
    # whenever it is installed, also in single-process commands) and says so on stdout when it finds
    # no GPU. torch finds none either then, and our own lines say the run is on the CPU.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # lm-eval's harness on a model object we built ourselves (finetune eval --lm-eval).
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
}


def stderr(message: str) -> None:
    """Print one status line to stderr (stdout stays free for machine-readable output)."""
    print(message, file=sys.stderr, flush=True)


class _DropUnactionable(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def drop_unactionable_lines() -> None:
    """Filter the UNACTIONABLE messages out of their loggers, before the libraries are imported.

    Cheap (stdlib logging only; a library that creates its logger later gets this one, filter
    included), so `import finetune` runs it and every command and worker process is covered.
    """
    for name, prefixes in UNACTIONABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropUnactionable) for f in logger.filters):
            logger.addFilter(_DropUnactionable(prefixes))


def quiet_libraries() -> None:
    """Silence library chatter (per-map progress bars, deprecation notices) so our own lines stay readable."""
    import warnings

    drop_unactionable_lines()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # bitsandbytes logs a missing optional `kernels` package at ERROR level on every CPU import
    logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
