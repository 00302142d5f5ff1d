"""Test settings: offline, one thread, the tiny model built once per session into a temp cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a Hub id would otherwise hang ~50 s before failing
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "deepspeed", "accelerate")


class FileProgress:
    """After the last test of each file, one line on the terminal (also under -q):
    `tests/test_x.py: 12 passed, 1 skipped in 8.4 s (done 3/31 files, elapsed 1:02)`."""

    def __init__(self, config):
        self.config, self.started = config, time.monotonic()
        self.left: Counter = Counter()  # file -> tests not yet finished
        self.outcomes: dict[str, Counter] = {}
        self.file_started: dict[str, float] = {}

    def pytest_collection_modifyitems(self, items):
        self.left = Counter(item.location[0] for item in items)

    def pytest_runtest_logstart(self, location):
        self.file_started.setdefault(location[0], time.monotonic())

    def pytest_runtest_logreport(self, report):
        category = self.config.hook.pytest_report_teststatus(report=report, config=self.config)[0]
        if category:  # "" for a passing setup or teardown
            self.outcomes.setdefault(report.location[0], Counter())[category] += 1

    @pytest.hookimpl(trylast=True)  # after the terminal's own progress marks for this test
    def pytest_runtest_logfinish(self, location):
        file = location[0]
        self.left[file] -= 1
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if self.left[file] or terminal is None:
            return
        done = sum(1 for n in self.left.values() if n == 0)
        counts = ", ".join(f"{n} {what}" for what, n in self.outcomes.get(file, Counter()).items())
        spent = time.monotonic() - self.file_started[file]
        elapsed = int(time.monotonic() - self.started)
        if terminal._tw.width_of_current_line:  # end the row of dots first
            terminal._tw.line()
        terminal._tw.line(f"{file}: {counts or 'nothing run'} in {spent:.1f} s "
                          f"(done {done}/{len(self.left)} files, elapsed {elapsed // 60}:{elapsed % 60:02d})")


def pytest_configure(config):
    if not config.option.collectonly:
        config.pluginmanager.register(FileProgress(config), "finetune-file-progress")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One FINETUNE_CACHE for the session, so builtin:tiny-llama is built once."""
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("finetune-cache"))
    yield


@pytest.fixture(scope="session")
def torch_one_thread():
    import torch

    torch.set_num_threads(1)
    return torch


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


# What libraries print that no user can act on: Python warnings from library code (FutureWarning,
# DeprecationWarning, PeftWarning, ...), DeepSpeed's accelerator guess and its [WARNING] lines, TorchScript
# notices, git's complaint inside lm-eval, torch's DDP note about unused parameters.
LIBRARY_NOTICE = re.compile(
    r"\w+Warning: |\bis deprecated\b|Setting (ds_)?accelerator|\[WARNING\]|torch\.jit|TorchScript|"
    r"fatal: not a git repository|find_unused_parameters"
)


def library_notices(output: str) -> list[str]:
    """The lines of a command's output that are library notices (LIBRARY_NOTICE) rather than our own lines."""
    return [line for line in output.splitlines() if LIBRARY_NOTICE.search(line)]


@pytest.fixture(scope="session")
def quickstart_train(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README quickstart's training, run once per session and shared: recipes/tiny/sft_lora.yaml as shipped,
    through the console entry point. Returns the run directory and the finished command (its stderr)."""
    tmp = tmp_path_factory.mktemp("quickstart")
    run = tmp / "tiny-sft-lora"
    result = run_cli("train", str(REPO / "recipes/tiny/sft_lora.yaml"), "--set", f"output.dir={run}", cwd=tmp)
    assert result.returncode == 0, result.stderr
    return run, result


@pytest.fixture(scope="session")
def quickstart(quickstart_train) -> Path:
    """The run directory of the README quickstart (quickstart_train)."""
    return quickstart_train[0]


def run_cli_light(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in a fresh process like `run_cli`, and also report on stdout's last line which heavy ML
    modules it imported (`HEAVY=torch,transformers`; `HEAVY=` for none): a refusal or a light command must
    not pay for the ML stack."""
    code = (
        "import sys\n"
        f"sys.argv = ['finetune', *{list(args)!r}]\n"
        "from finetune.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        # a module set to None is one finetune.train.startup hid from the process, not an import
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if sys.modules.get(m) is not None))\n"
        "sys.exit(code)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=os.environ.copy())


def invoke_cli(*args: str, input: str | None = None):
    """Run a finetune command in this process: the same Typer app, argument parsing and error handling as
    the console entry point (`finetune.cli.app.main`), without paying the ML imports again per command."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.cli.app import _bare_resume
    from finetune.errors import UserError

    result = CliRunner().invoke(app, _bare_resume([str(a) for a in args]), input=input)
    code, err = result.exit_code, result.stderr
    if isinstance(result.exception, UserError):
        code = result.exception.exit_code
        err += f"{getattr(result.exception, 'label', 'error')}: {result.exception.render()}\n"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=code, stdout=result.stdout, stderr=err)
