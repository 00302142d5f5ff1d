"""What the user sees on the terminal: our own lines on stderr, library chatter kept quiet."""

from __future__ import annotations

import sys


def stderr(message: str) -> None:
    """Print one status line to stderr (stdout stays free for machine-readable output)."""
    print(message, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Silence library chatter (per-map progress bars, deprecation notices) so our own lines stay readable."""
    import logging
    import warnings

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
