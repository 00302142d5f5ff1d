"""Commands print only what the user can act on: no library notices about how we call the library."""

from __future__ import annotations

import logging

import pytest

from finetune.logs import UNACTIONABLE, drop_unactionable_lines
from tests.conftest import run_cli

# Lines that libraries print on import or on every call and that no user can act on.
NOISE = ["Setting accelerator to CPU", "Setting ds_accelerator", "[WARNING]",
         "FutureWarning", "DeprecationWarning", "is deprecated"]


def test_a_real_command_prints_no_library_notices(tmp_path):
    pytest.importorskip("deepspeed")  # installed, it is imported by transformers and logs its accelerator guess
    result = run_cli("tiny-model", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if any(n in line for n in NOISE)] == []
    assert "wrote a tiny llama model" in output


def _emitted(logger_name: str, message: str) -> bool:
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger(logger_name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return bool(records)


def test_only_the_unactionable_messages_are_dropped():
    drop_unactionable_lines()
    drop_unactionable_lines()  # twice is the same as once
    assert sum(type(f).__name__ == "_DropUnactionable" for f in logging.getLogger("DeepSpeed").filters) == 1
    for name, prefixes in UNACTIONABLE.items():
        for prefix in prefixes:
            assert not _emitted(name, prefix + " (rest of the message)")
        assert _emitted(name, "a real warning stays")
    assert _emitted("DeepSpeed.child", "Setting accelerator to CPU")  # only the named logger is filtered
