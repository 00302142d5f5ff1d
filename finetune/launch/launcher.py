"""Plan and start a multi-process run: `finetune train` re-launches itself through `accelerate launch`.

Why accelerate launch (and not torchrun directly): one accelerate config file carries DDP,
DeepSpeed, FSDP and the multi-node layout, and the Trainer reads all of it from the environment
accelerate sets up, so no launcher setting has to pass through the trainer's arguments (accelerate
starts the processes with torch's own elastic launcher, torchrun, underneath). The command runs as
a separate program rather than through accelerate's Python API so that the printed command is
exactly what runs (a user can re-run it from the run directory's launch.sh), and so that this process
can wait for it and end with a plain message when a worker stops on bad input.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune.errors import UserError
from finetune.launch.configs import accelerate_config
from finetune.launch.rules import Context, Machine, check_launch
from finetune.logs import stderr
from finetune.recipe import LoadedRecipe, Recipe
from finetune.run.layout import RunDir

WORKER_MODULE = "finetune.launch.worker"

Runner = Callable[[list[str], dict[str, str]], int]


@dataclass
class LaunchPlan:
    """What a launch runs: the command, what it adds to the environment, the files it needs."""

    argv: list[str]
    env: dict[str, str]
    files: dict[Path, str] = field(default_factory=dict)
    summary: str = ""
    warnings: list[str] = field(default_factory=list)  # what this machine lacks (launch-plan only)

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def render(self) -> str:
        """The plan as `finetune launch-plan` prints it."""
        lines = [f"# warning (this machine; the machines that run it may differ): {w}" for w in self.warnings]
        lines += [f"# {self.summary}", "# environment: the current one, plus"]
        lines += [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        lines += ["# command", self.command]
        for path, text in self.files.items():
            lines += [f"# --- {path}", text.rstrip("\n")]
        return "\n".join(lines) + "\n"


def build_context(recipe: Recipe, machine: Machine | None = None, *, planning: bool = False) -> Context:
    """Machine facts for a recipe; on a machine without GPUs also refuse bf16/fp16 here (not when planning).

    With GPUs the processes resolve precision themselves: asking whether a GPU supports bf16 would
    initialise CUDA in this process, which then held memory on GPU 0 for the whole run.
    """
    machine = machine or Machine.detect()
    if machine.gpus == 0 and not planning:
        from finetune.model.load import resolve_precision

        resolve_precision(recipe)
    return Context(recipe, machine)


def prepare_launch(loaded: LoadedRecipe, machine: Machine | None = None, *, planning: bool = False) -> LaunchPlan:
    """Check everything that can be checked before a process starts, then plan the launch.

    `planning` (launch-plan) plans for other machines too: what only this machine lacks (cores, GPUs,
    packages) becomes a warning in the plan instead of a refusal.
    """
    from finetune.train.checks import check_recipe_inputs  # what validate checks, then model.path's chain

    recipe = loaded.recipe
    check_recipe_inputs(loaded)
    ctx = build_context(recipe, machine, planning=planning)
    warnings = check_launch(ctx, loaded.origins, planning=planning)
    plan = plan_launch(ctx, Path(recipe.run_dir))
    plan.warnings = warnings
    return plan


def plan_launch(ctx: Context, run_dir: Path) -> LaunchPlan:
    """The command and files of a launch that passed the rules (check_launch)."""
    d, run = ctx.d, RunDir(run_dir.resolve())
    assert ctx.processes is not None  # check_launch refuses an unresolvable `auto`
    ds = ctx.ds
    ds_file = run.deepspeed_config if ds is not None else None
    acc_file = run.accelerate_config
    acc = accelerate_config(d, ctx.processes, ctx.named, ds_file, ctx.zero_stage)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_file)]
    if d.rdzv_backend != "static":  # read from the command line only (see configs.recipe_owned_values)
        argv += ["--rdzv_backend", d.rdzv_backend]
    argv += ["-m", WORKER_MODULE, str(run.recipe)]
    # one compute thread per process unless the user chose otherwise (torchrun does the same, with a warning)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if d.strategy == "deepspeed" and ctx.machine.gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"  # said, rather than guessed by DeepSpeed with a warning in every process
    what = d.strategy + (f" ZeRO-{ctx.zero_stage}" if ctx.zero_stage else "")
    where = f"machine {d.machine_rank} of {d.num_machines}" if d.num_machines > 1 else "this machine"
    summary = f"{ctx.processes} process(es) on {where}, {what}, {ctx.world} in all"
    source = f" from {ctx.named.path}" if ctx.named else " from the recipe's distributed section"
    header = f"# accelerate config written by finetune{source}; launched with:\n# {shlex.join(argv)}\n"
    files = {acc_file: header + yaml.safe_dump(acc, sort_keys=False)}
    if ds_file is not None:
        files[ds_file] = json.dumps(ds, indent=2) + "\n"
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    files[run.launch_script] = (
        "#!/usr/bin/env bash\n# The command `finetune train` ran for this run. Running it again trains again, "
        "writing into this directory.\n"
        f"cd {shlex.quote(os.getcwd())}\n{env_text} exec {shlex.join(argv)}\n"
    )
    return LaunchPlan(argv=argv, env=env, files=files, summary=summary)


class LaunchFailed(UserError):
    """The launched processes failed for a reason other than bad input; their own output says why."""

    exit_code = 1


# torch.distributed's launcher logs (glog style: "E1122 07:06:35.29 ...") and its own traceback
_LAUNCHER_NOISE = re.compile(r"^([WEI]\d{4} \d\d:\d\d:\d\d|Traceback \(most recent call last\):)")


def run_command(argv: list[str], env: dict[str, str], *, error_file: Path | None = None) -> int:
    """Run the launcher, pass its output on, and return its exit code (128 + signal after a signal).

    The launcher runs in its own session, so Ctrl-C in a terminal reaches this process only, and this
    process passes SIGINT (and a scheduler's SIGTERM) to the training processes themselves: each then
    saves a checkpoint at the step boundary all of them agree on (train.callbacks.StopOnSignal) and exits.
    Signalling torch's launcher instead would make it pass the signal on a second time, which the workers
    take for "stop at once, without a checkpoint". A second signal from the user is passed on the same way.
    When a worker said why it stopped in `error_file` (bad input, or an interruption with the command that
    resumes), the launcher's own logs and traceback about that exit are held back. A real crash still shows
    everything.
    """
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        _signal_workers(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    held: list[str] = []
    try:
        for line in process.stderr:
            if held or _LAUNCHER_NOISE.match(line):
                held.append(line)
            else:
                sys.stderr.write(line)
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held and not (code and error_file is not None and error_file.is_file()):
        sys.stderr.writelines(held)
    return 128 + received[0] if received and code else code


def _signal_workers(launcher_pid: int, signum: int) -> None:
    """Send a signal to the training processes under the launcher (not the launcher itself)."""
    import psutil  # a dependency of accelerate

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children or []:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)


def launch_training(
    loaded: LoadedRecipe, *, overwrite: bool = False, resume: str | None = None, force: bool = False,
    resume_command: str | None = None, runner: Runner | None = None, log=None, machine: Machine | None = None,
) -> Path:
    """Check the launch, write the resolved recipe and launch files into the run dir, then run it.

    `resume` (a checkpoint, a run dir, or checkpoints.LATEST) is resolved here, once, so every process
    resumes the same checkpoint; `force` resumes despite recipe or data changes (each process checks).
    `resume_command` is what an interrupted run tells the user to type.
    `runner(argv, env) -> exit code` starts the command (default: run_command); tests pass a recorder.
    Everything that can be refused is refused before the run directory is created.
    """
    from finetune.redact import redact
    from finetune.run.checkpoints import resolve_resume, write_atomic
    from finetune.run.lock import check_claimable, claim_run_dir

    log = log or stderr
    recipe = loaded.recipe
    run_dir = Path(recipe.run_dir)
    resuming = resume is not None
    check_claimable(run_dir, overwrite=overwrite, resume=resuming)  # before the machine (torch) is looked at
    plan = prepare_launch(loaded, machine)
    lock = claim_run_dir(run_dir, overwrite=overwrite, resume=resuming, log=log)  # held until the workers end
    try:
        if resume is not None:
            checkpoint = resolve_resume(resume, run_dir, log).resolve()
            plan.argv += ["--resume", str(checkpoint)] + (["--force"] if force else [])
        if resume_command:
            plan.env["FINETUNE_RESUME_COMMAND"] = resume_command
        recipe_yaml = yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False, allow_unicode=True)
        write_atomic(RunDir(run_dir).recipe, recipe_yaml)
        return _launch(plan, run_dir, runner, log, resume_command)
    finally:
        lock.release()


def _stopped(run: RunDir, code: int, resume_command: str | None) -> str:
    """What to say when the processes stopped on a signal without saying it themselves."""
    from finetune.run.checkpoints import list_checkpoints

    complete = list_checkpoints(run.checkpoints)[0]
    saved = f"the latest complete checkpoint is {complete[-1]}" if complete else "no checkpoint was saved"
    how = f"Resume with:\n  {resume_command}" if complete and resume_command else "start it again"
    return f"{signal.Signals(code - 128).name}: training stopped; {saved}. {how}"


def _launch(plan, run_dir: Path, runner, log, resume_command: str | None = None) -> Path:
    from finetune.train.interrupt import RunInterrupted

    run = RunDir(run_dir)
    # an earlier run's (--overwrite clears them too; a bare `finetune train` never reaches here over a run)
    for path in (run.accelerate_config, run.deepspeed_config, run.launch_script, run.launch_error):
        path.unlink(missing_ok=True)
    for path, text in plan.files.items():
        path.write_text(text, encoding="utf-8")
    error_file = run.launch_error
    log(f"run directory: {run_dir}  (resolved recipe, {', '.join(p.name for p in plan.files)})")
    log(f"launching {plan.summary}: {plan.command}")
    runner = runner or functools.partial(run_command, error_file=error_file)
    code = runner(plan.argv, {**os.environ, **plan.env})
    if code:
        said = error_file.read_text(encoding="utf-8").strip() if error_file.is_file() else ""
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # the user or a scheduler stopped the run
            raise RunInterrupted(said or _stopped(run, code, resume_command), exit_code=code)
        if said:  # a worker met bad input (a data row, a path) and said what
            raise UserError(f"training stopped: {said}")
        raise LaunchFailed(
            f"the training processes failed (exit code {code}); their messages are above. "
            f"The same launch again: bash {run.launch_script}"
        )
    return run_dir


def describe_launch(loaded: LoadedRecipe, machine: Machine | None = None) -> str:
    """What `finetune train` would run for this recipe, as text; nothing is started or written."""
    recipe = loaded.recipe
    if recipe.distributed.strategy == "none":
        return "# one process: `finetune train` trains in its own process; no launcher, no launch files\n"
    plan = prepare_launch(loaded, machine, planning=True)
    recipe_file = RunDir.at(recipe.run_dir).recipe
    note = f"# nothing started; `finetune train` writes {recipe_file} and the files below, then runs"
    return note + "\n" + plan.render()
