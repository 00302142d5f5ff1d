"""The Dockerfile keeps its rules (checked statically: no Docker engine runs on these machines)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "check_dockerfile.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_dockerfile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dockerfile_passes_hadolint_and_our_rules():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rules: ok" in result.stdout


def test_each_rule_catches_its_mistake(tmp_path):
    (tmp_path / "constraints.txt").write_text("torch==2.13.0\n")
    (tmp_path / "finetune").mkdir()
    (tmp_path / ".dockerignore").write_text("*\n!constraints.txt\n")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime\n"
        "ENV HF_HOME=/cache/hf FINETUNE_CACHE=/data/finetune\n"
        "COPY finetune configs ./\n"
        "RUN pip install torch \\\n && pip install -c constraints.txt .\n"
        "COPY constraints.txt ./\n"
        "VOLUME /cache\n"
        "USER root\n"
    )
    problems = "\n".join(_checker().check(dockerfile))
    for expected in ["not a CUDA devel image", "torch 2.7.1 in the image, but constraints.txt locks torch==2.13.0",
                     "COPY finetune: excluded by .dockerignore", "COPY configs: no such file",
                     "`pip install torch` does not install from the lock",
                     "pip install -c constraints.txt before COPY constraints.txt",
                     "runs as root", "no HEALTHCHECK", "FINETUNE_CACHE=/data/finetune is not in a VOLUME"]:
        assert expected in problems
    assert "HF_HOME" not in problems
