"""The run lifecycle, as a user meets it: interrupt, crash, resume, locks, provenance, secrets, trackers.

One uninterrupted reference run (with every tracker on, and fake secrets planted in the
environment and the recipe) is what the interrupted and crashed runs must land on exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe import load_recipe
from tests.conftest import REPO, invoke_cli, run_cli_light

SECRETS = {
    "HF_TOKEN": "hf_PlantedEnvToken0123456789abcdefXYZ",
    "WANDB_API_KEY": "PlantedWandbKey0123456789abcdef0123456789",
    "MLFLOW_TRACKING_PASSWORD": "PlantedMlflowPassword987",
    "MY_SERVICE_API_KEY": "PlantedServiceKey-zz-42-42",
}
RECIPE_SECRET = "hf_PlantedRecipeToken0123456789abcdefQRS"
ARGV_SECRET = "hf_PlantedArgvToken0123456789abcdefLMN"  # given on the command line (wandb records argv)
STEPS = 60


def write_recipe(tmp: Path, name: str, *, report_to=(), **training) -> Path:
    """A 60-step LoRA run on a local copy of the sample data, saving every 10 steps and at epoch ends."""
    data = tmp / "train.jsonl"
    if not data.exists():
        lines = (REPO / "finetune/resources/data/sample_chat.jsonl").read_text().splitlines()[:64]
        data.write_text("\n".join(lines) + "\n")
    recipe = {
        "name": name,
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"path": str(data)}],
                 "eval": [{"path": "builtin:sample_eval_chat.jsonl", "max_rows": 8}]},
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 1e-2, "max_steps": STEPS, "micro_batch_size": 4, "max_length": 128,
                     "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler": "cosine", "save_steps": 10,
                     "eval_steps": 10, "save_each_epoch": True, "keep_best_checkpoint": True, **training},
        "logging": {"report_to": list(report_to), "run_name": f"run-{RECIPE_SECRET}"},
        "output": {"dir": str(tmp / "runs" / name)},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(path: Path, overrides=(), **kwargs) -> Path:
    from finetune.train.run import run_training

    kwargs.setdefault("log", lambda _: None)
    return run_training(load_recipe(path, list(overrides)), **kwargs)


def adapter(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    import torch

    got, want = adapter(run_dir), adapter(reference)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    got_losses, want_losses = losses(run_dir), losses(reference)
    assert [s for s, _ in got_losses] == list(range(1, STEPS + 1))  # every step once: no replayed records
    assert [v for _, v in got_losses] == pytest.approx([v for _, v in want_losses], rel=1e-5)


def assert_no_secret_in(run_dir: Path) -> None:
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for secret in [*SECRETS.values(), RECIPE_SECRET, ARGV_SECRET]:
        leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret} written to {leaks}"


@pytest.fixture(scope="module")
def planted():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in SECRETS.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, torch_one_thread, planted):
    """An uninterrupted run with wandb (offline), tensorboard and mlflow, from a recipe in a git repository."""
    tmp = tmp_path_factory.mktemp("reference")
    trackers = [t for t in ("wandb", "tensorboard", "mlflow") if _installed(t)]
    path = write_recipe(tmp, "reference", report_to=trackers)
    git = ["git", "-C", str(tmp), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", path.name], check=True)
    subprocess.run([*git, "commit", "-qm", "recipe"], check=True)
    override = f"logging.run_name=run-{RECIPE_SECRET}-{ARGV_SECRET}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setattr(sys, "argv", ["finetune", "train", str(path), "--set", override])  # as the CLI sees it
        run_dir = train(path, [override])
        assert sys.argv[-1] == override  # restored after the run
    return run_dir


def _installed(tracker: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(tracker) is not None


@pytest.mark.slow
def test_sigint_at_step_30_then_resume_lands_where_the_uninterrupted_run_lands(reference, tmp_path):
    path = write_recipe(tmp_path, "interrupted")
    run_dir = tmp_path / "runs" / "interrupted"
    child = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    lines = []
    for line in child.stderr:
        lines.append(line)
        if line.startswith("step 30/") and "SIGINT" not in "".join(lines):
            child.send_signal(signal.SIGINT)  # what Ctrl-C sends, once (step 30 also prints an eval line)
    assert child.wait(timeout=120) == 130, "".join(lines)
    stderr = "".join(lines)
    assert f"Resume with:\n  finetune train {path} --resume" in stderr
    assert "eta " in stderr and "tok/s" in stderr and "rss " in stderr  # the plain-line display
    stopped = [p for p in (run_dir / "checkpoints").iterdir() if (p / "finetune_checkpoint.json").is_file()]
    last = max(int(p.name.split("-")[1]) for p in stopped)
    assert 30 <= last < STEPS, stderr  # saved at a step boundary right after the signal, well before the end
    assert not (run_dir / "adapter").exists() and not (run_dir / ".finetune.lock").exists()
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "interrupted"

    resumed = invoke_cli("train", str(path), "--resume")  # in this process: the ML imports are paid already
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{last}'} (step {last})" in resumed.stderr
    assert_same_run(run_dir, reference)
    summary, whole = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["resumed_from_step"] == last and [r["step"] for r in summary["resumes"]] == [last]
    # The counters carry on from the checkpoint, and the summary covers both segments, not the last alone.
    assert summary["tokens"] == whole["tokens"] and summary["tokens"]["num_trained_tokens"] > 0
    assert summary["first_and_last"]["loss"] == pytest.approx(whole["first_and_last"]["loss"], rel=1e-5)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    counts = [(r["step"], r["num_trained_tokens"]) for r in metrics if "num_trained_tokens" in r]
    assert counts == [(r["step"], r["num_trained_tokens"]) for r in expected if "num_trained_tokens" in r]
    assert_no_secret_in(run_dir)


class CrashWhileSaving:
    """Raises in on_save at one step: after the Trainer wrote the checkpoint's files, before it was committed."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class Crash(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise RuntimeError(f"simulated crash while writing checkpoint-{step}")

        return Crash()


@pytest.mark.slow
def test_crash_mid_checkpoint_resumes_from_the_last_complete_one(reference, tmp_path):
    path = write_recipe(tmp_path, "crashed")
    run_dir = tmp_path / "runs" / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(path, callbacks=(CrashWhileSaving(40),))
    torn = run_dir / "checkpoints" / "checkpoint-40"
    assert (torn / "adapter_model.safetensors").is_file() and not (torn / "finetune_checkpoint.json").exists()
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "failed: RuntimeError"
    assert not (run_dir / ".finetune.lock").exists()

    lines = []
    train(path, resume=str(run_dir), log=lines.append)  # --resume RUN_DIR: its latest complete checkpoint
    assert f"warning: skipping {torn}: incomplete (the run stopped while writing it)" in lines
    assert any("checkpoint-32 (step 32)" in line for line in lines), lines  # the epoch-end checkpoint
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["padded", "grouped", "packed"])
def test_resume_replays_every_batching_mode(batching, tmp_path, torch_one_thread):
    """Crash at step 40 of 60 and resume: the run lands where an uninterrupted one does, in every batching mode.

    The default (padding_free) is the reference of the tests above. LoRA dropout draws from torch's RNG
    during every epoch, so an order drawn from that RNG when an epoch starts (transformers'
    LengthGroupedSampler) differs after a resume; grouped batches must draw each epoch's order again exactly.
    """
    overrides = ["method.packing=true"] if batching == "packed" else [f"training.batching={batching}"]
    overrides.append("adapter.dropout=0.1")
    reference = train(write_recipe(tmp_path, "uninterrupted"), overrides)
    path = write_recipe(tmp_path, "crashed")
    run_dir = tmp_path / "runs" / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(path, overrides, callbacks=(CrashWhileSaving(40),))
    train(path, overrides, resume=str(run_dir))
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_or_data_unless_forced(reference, tmp_path):
    from finetune.run.checkpoints import LATEST, check_resume, list_checkpoints
    from finetune.run.provenance import hash_data

    path = reference.parent.parent / "reference.yaml"
    before = (reference / "recipe.yaml").read_text()
    with pytest.raises(UserError) as refused:
        train(path, ["training.learning_rate=0.02", "logging.report_to=[]"], resume=LATEST)
    assert "training.learning_rate: 0.01 -> 0.02" in refused.value.render()
    assert "--force" in str(refused.value) and "report_to" not in refused.value.render()  # logging may change
    assert (reference / "recipe.yaml").read_text() == before  # nothing written

    data = reference.parent.parent / "train.jsonl"
    original = data.read_text()
    try:
        data.write_text(original.replace("capital", "Capital", 1))
        with pytest.raises(UserError) as refused:
            train(path, ["logging.report_to=[]"], resume=LATEST)
        assert f"data.train[0] ({data}): file content changed since the checkpoint" in refused.value.render()
        recipe = load_recipe(path, ["logging.report_to=[]"]).recipe
        warnings = []
        checkpoint = list_checkpoints(reference / "checkpoints")[0][-1]
        check_resume(checkpoint, recipe.model_dump(mode="json"), hash_data(recipe), force=True, log=warnings.append)
        assert any("file content changed" in w for w in warnings)
    finally:
        data.write_text(original)


@pytest.mark.slow
def test_provenance_model_card_trackers_and_no_planted_secret(reference):
    assert_no_secret_in(reference)
    provenance = json.loads((reference / "provenance.json").read_text())
    assert provenance["status"] == "completed" and provenance["metrics"]["global_step"] == STEPS
    assert provenance["recipe"]["logging"]["run_name"] == "run-<redacted>-<redacted>"
    if _installed("wandb"):  # wandb keeps the command line it saw in its run files: redacted there
        seen = b"logging.run_name=run-<redacted>-<redacted>"
        assert any(seen in p.read_bytes() for p in (reference / "wandb").rglob("*") if p.is_file())
    assert provenance["git"]["revision"] == subprocess.run(
        ["git", "-C", str(reference.parent.parent), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    data = provenance["data"][0]
    from finetune.run.provenance import sha256_file

    assert data["sha256"] == sha256_file(Path(data["path"]))
    assert {"torch", "transformers", "trl", "peft"} <= provenance["packages"].keys()
    assert provenance["hardware"]["cpu_count"] >= 1
    card = (reference / "adapter" / "README.md").read_text()
    assert "builtin:tiny-llama" in card and data["sha256"][:16] in card and "AutoPeftModelForCausalLM" in card

    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == list(range(10, STEPS + 1, 10))
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    best = min(evals, key=lambda r: r["eval_loss"])["step"]
    assert (reference / "checkpoints" / f"checkpoint-{best}" / "finetune_checkpoint.json").is_file()
    for tracker, written in (("wandb", "wandb"), ("tensorboard", "tensorboard"), ("mlflow", "mlruns")):
        if _installed(tracker):  # the dev extra installs all three
            assert any((reference / written).rglob("*")), f"{tracker} wrote nothing in the run dir"


@pytest.mark.slow
def test_disk_estimate_matches_a_real_checkpoint_and_refuses_a_small_disk(reference, tmp_path):
    from finetune.train.checks import SMALL_FILES, DiskPlan, check_disk

    estimate = json.loads((reference / "provenance.json").read_text())["disk_estimate_bytes"]
    checkpoint = reference / "checkpoints" / f"checkpoint-{STEPS}"
    written = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert written <= estimate["checkpoint"] <= written + SMALL_FILES, (written, estimate)  # an upper bound
    big = sum((checkpoint / f).stat().st_size for f in ("adapter_model.safetensors", "optimizer.pt"))
    assert abs(estimate["weights"] + estimate["optimizer"] - big) < 0.1 * big, (big, estimate)
    plan = DiskPlan(weights=estimate["weights"], optimizer=estimate["optimizer"], tokenizer=0, checkpoints=3)
    with pytest.raises(UserError, match=r"has 1\.0 MiB free but this run writes up to 3 checkpoint.*save_total_limit"):
        check_disk(plan, tmp_path, log=print, free=2**20)


@pytest.mark.slow
def test_pickle_only_model_is_refused_unless_opted_in(tmp_path, torch_one_thread):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_model, resolve_precision

    source = Path(resolve_model_path("builtin:tiny-llama"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (pickled / file.name).write_bytes(file.read_bytes())
    torch.save(AutoModelForCausalLM.from_pretrained(source).state_dict(), pickled / "pytorch_model.bin")
    path = write_recipe(tmp_path, "pickle")
    with pytest.raises(UserError, match=r"only pickle files: pytorch_model\.bin.*model\.allow_pickle_weights: true"):
        train(path, [f"model.path={pickled}"])
    recipe = load_recipe(path, [f"model.path={pickled}", "model.allow_pickle_weights=true"]).recipe
    assert load_model(str(pickled), recipe, resolve_precision(recipe)).num_parameters() > 0


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
    from finetune.run.lock import LOCK_NAME, RunLock, claim_run_dir

    run_dir = tmp_path / "runs" / "locked"
    path = write_recipe(tmp_path, "locked")
    lock = claim_run_dir(run_dir, overwrite=False, resume=False)
    with pytest.raises(UserError, match=rf"another finetune run \(pid {os.getpid()}, since"):
        train(path)  # the same directory, while this process holds it
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "1"}))
    RunLock(run_dir).acquire().release()  # the dead holder's lock is taken over
    reused = {"host": os.uname().nodename, "pid": os.getpid(), "started": "not-my-start-time"}
    (run_dir / LOCK_NAME).write_text(json.dumps(reused))  # a live pid, but not the process that locked
    RunLock(run_dir).acquire().release()
    (run_dir / LOCK_NAME).write_text('{"host": "gpu-node-7", "pid": 12')  # torn by a crash mid-write
    RunLock(run_dir).acquire().release()


SIGNAL_SCRIPT = """
import sys, time
from finetune.train.interrupt import StopRequest
with StopRequest() as stop:
    print("ready", flush=True)
    while not stop.requested:
        time.sleep(0.05)
    print("stop requested", flush=True)
    while True:  # a step that never ends: only the second signal can end the process
        time.sleep(0.05)
"""


def test_second_signal_exits_at_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)  # what a cluster scheduler sends
        assert child.stdout.readline() == "stop requested\n"
        child.send_signal(signal.SIGTERM)
        # The step never ends by itself, so exiting at all proves the second signal did not wait for it
        # (the timeout only turns a hang into a failure).
        assert child.wait(timeout=120) == 143
    finally:
        child.kill()
    stderr = child.stderr.read()
    assert "SIGTERM received: saving a checkpoint when this step ends" in stderr
    assert "SIGTERM again: stopping now, without a checkpoint" in stderr


def test_progress_display_in_a_terminal_shows_eta_loss_lr_rate_memory(torch_one_thread):
    import io

    from transformers import TrainerControl, TrainerState

    from finetune.train.progress import ProgressDisplay

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    display = ProgressDisplay(stream=screen)
    state, control = TrainerState(max_steps=10), TrainerControl()
    display.on_train_begin(None, state, control)
    for step in range(1, 4):
        display.on_step_begin(None, state, control)
        state.global_step = step
        display.on_step_end(None, state, control)
        display.on_log(None, state, control, logs={"loss": 1.5, "learning_rate": 2e-4, "num_tokens": 100 * step})
    display.on_log(None, state, control, logs={"eval_loss": 1.0, "eval_perplexity": math.e})
    display.on_train_end(None, state, control)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without colours
    for expected in ("3/10", "eta", "loss 1.5000", "lr 2.00e-04", "tok/s", "rss ", "perplexity 2.718"):
        assert expected in text, (expected, text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resume"], "no complete checkpoint in"),
        (["--resume", "--overwrite"], "choose one"),
        (["--resume", "nowhere"], "--resume: nowhere: no such directory"),
    ],
)
def test_resume_flag_errors_exit_2_before_any_model_loads(argv, message, tmp_path):
    path = write_recipe(tmp_path, "cli")
    result = run_cli_light("train", str(path), *argv, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1] == "HEAVY="  # refused before torch, let alone a model, was imported


def test_bare_resume_takes_the_latest_checkpoint():
    from finetune.cli.app import _bare_resume
    from finetune.run.checkpoints import LATEST

    assert _bare_resume(["train", "r.yaml", "--resume"]) == ["train", "r.yaml", f"--resume={LATEST}"]
    assert _bare_resume(["train", "r.yaml", "--resume", "--force"])[2] == f"--resume={LATEST}"
    assert _bare_resume(["train", "--resume", "r.yaml"]) == ["train", f"--resume={LATEST}", "r.yaml"]
    assert _bare_resume(["train", "r.yaml", "--resume", "runs/x"]) == ["train", "r.yaml", "--resume", "runs/x"]


def test_keep_best_checkpoint_needs_an_eval_at_every_checkpoint(tmp_path):
    path = write_recipe(tmp_path, "best", save_steps=15)
    with pytest.raises(UserError) as refused:
        load_recipe(path)
    assert "training.keep_best_checkpoint: needs evaluation at every checkpoint" in refused.value.render()


def test_redaction_of_env_and_key_shaped_values(monkeypatch):
    from finetune.redact import redact, secret_key_paths

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-hunter2")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-false")  # not a secret, though it says TOKEN
    text = "pw hunter2-hunter2 tok hf_abcdefghijklmnopqrstuvwxyz0123 sk-ABCDEFGHIJKLMNOPQRSTUVWX false-false"
    assert redact({"a": [text]}) == {"a": ["pw <redacted> tok <redacted> <redacted> false-false"]}
    assert secret_key_paths({"logging": {"run_name": "x-hf_abcdefghijklmnopqrstuvwxyz0123"}, "name": "ok"}) == [
        "logging.run_name"
    ]


def test_overwrite_starts_afresh_and_never_resumes_the_previous_runs_checkpoints(tmp_path, torch_one_thread):
    from finetune.run.checkpoints import LATEST, MARKER, commit_checkpoint
    from finetune.train.lifecycle import RunLifecycle

    path = write_recipe(tmp_path, "again")
    old = tmp_path / "runs" / "again" / "checkpoints" / "checkpoint-50"
    old.mkdir(parents=True)
    commit_checkpoint(old, step=50, epoch=3.1, samples=200, recipe_yaml="name: again\n", data=[])
    (old.parent.parent / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    lines = []
    with RunLifecycle(load_recipe(path), overwrite=True, resume=None, force=False, log=lines.append) as run:
        assert (run.dir / ".finetune.lock").is_file()
    assert not (old / MARKER).exists() and (old / "recipe.yaml").is_file()  # kept, but no longer resumable
    assert any("will not be resumed from" in line for line in lines)
    assert (run.dir / "metrics.jsonl").read_text() == "" and not (run.dir / ".finetune.lock").exists()
    with pytest.raises(UserError, match="no complete checkpoint"):
        RunLifecycle(load_recipe(path), overwrite=False, resume=LATEST, force=False, log=print).__enter__()
