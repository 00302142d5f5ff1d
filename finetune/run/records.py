"""The records a run directory holds, typed: summary, provenance, merge report, audit.

Each is a pydantic model with a `format_version`, and is read and written only through the
functions here (other modules never `json.loads` a run's file or mutate its dict). Files written
before the version field existed read as version 1. Provenance passes through `redact` on every
write, so no token from the environment or the recipe reaches the disk.

Derived outputs carry their origin: `content_sha256` hashes the files of an adapter (or model)
directory, and the merge report and GGUF metadata record it, so a stale output is detected
rather than reused (`finetune.run.resolve`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from finetune.errors import UserError
from finetune.run.layout import MODEL_CARD, MergedDir, RunDir

FORMAT_VERSION = 1

# Provenance status values. A run that stopped before its first optimizer step trained nothing: the
# next plain `finetune train` replaces it (run.lock.claim_run_dir) and --resume says there is nothing to resume.
RUNNING = "running"
COMPLETED = "completed"
INTERRUPTED = "interrupted"
FAILED = "failed"  # written as "failed: ExceptionName"
FAILED_BEFORE_START = "failed-before-start"
INTERRUPTED_BEFORE_START = "interrupted-before-start"
BEFORE_START = (FAILED_BEFORE_START, INTERRUPTED_BEFORE_START)

# GGUF metadata keys of an export's origin (llama.cpp ignores keys it does not know).
GGUF_SOURCE_SHA256 = "finetune.source.sha256"
GGUF_SOURCE_PATH = "finetune.source.path"


class Record(BaseModel):
    """A record written to a run directory."""

    format_version: int = FORMAT_VERSION


class ResumePoint(BaseModel):
    """One resume of a run: the step it continued from, and when (UTC)."""

    step: int
    at: str


class Summary(Record):
    """summary.json: the outcome of a finished run, over all its segments when it was resumed.

    train_seconds, tokens and first_and_last cover the whole run; resumes lists every resume point.
    Extra keys are the trainer's own metrics (train_loss, train_runtime, ...), which differ by method and
    cover the last segment only.
    """

    model_config = ConfigDict(extra="allow")

    method: str
    train_seconds: float
    global_step: int
    tokens: dict[str, int] | None = None  # num_trained_tokens, num_input_tokens, num_tokens (SFT)
    resumes: list[ResumePoint] = []
    final_loss: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    best_checkpoint: str | None = None
    resumed_from_step: int | None = None
    reference_model: str | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_memory_bytes: int | None = None
    first_and_last: dict[str, dict[str, float]] | None = None


class StartRecord(BaseModel):
    """What a run's model.path named when it was an earlier run, and the identity of what was loaded from it."""

    run: str
    start_from: Literal["adapter", "merged", "model"]
    sha256: str | None = None  # for start_from merged: the adapter sha256 its merge report records


class LogitDistance(BaseModel):
    """How far one model's logits are from another's, over the attended positions of the verification prompts."""

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top_token_agreement: float  # share of positions where both put the same token on top


class MergeGate(BaseModel):
    """The limits of the saved dtype (merge.bake.GATES) and which the merge missed."""

    limits: dict[str, float]
    passed: bool
    failed: list[str] = []


class MergeReport(Record):
    """merged/merge_report.json: what was merged into what, and how the saved model compares."""

    model_config = ConfigDict(extra="allow")  # later verification fields travel with the report

    adapter: str
    adapter_sha256: str | None = None  # content_sha256 of the adapter directory; None in reports before it existed
    base: str
    adapter_kind: str
    merged_into: str
    base_dtype: str
    saved_dtype: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top_token_agreement: float | None = None  # None in reports from before the merge check gated
    greedy_generations_agree: bool
    gate: MergeGate | None = None  # None in reports from before the merge check gated
    vs_trained_4bit_model: LogitDistance | None = None  # QLoRA: the merge against the 4-bit base + adapter
    prompts: list[str] = []
    merged_generations: list[str] = []
    weight_files: list[str] = []


class BaseIdentity(BaseModel):
    """Which base weights a run trained on: a Hub id at a revision, or a local model's content sha256."""

    id: str | None = None  # Hub id
    revision: str | None = None  # Hub revision ("main" when the recipe names none)
    path: str | None = None  # local directory
    sha256: str | None = None  # over config.json and the weight files (provenance.base_identity)


class Provenance(Record):
    """provenance.json: what produced a run, on what, from which data, and how it ended."""

    finetune_version: str
    status: str
    started: str
    finished: str | None = None
    command: list[str]
    recipe_file: str | None = None
    git: dict[str, Any] | None = None
    resumed_from: str | None = None
    start: StartRecord | None = None
    base_model: BaseIdentity | None = None  # the true base (through earlier runs), identified
    steps_done: int = 0  # optimizer steps trained when the record was written
    recipe: dict[str, Any]
    data: list[dict[str, Any]]
    packages: dict[str, str]
    hardware: dict[str, Any]
    metrics: dict[str, Any] | None = None
    disk_estimate_bytes: dict[str, int] | None = None
    merge: MergeReport | None = None  # in a merged model's copy of the provenance

    @property
    def before_start(self) -> bool:
        """Whether the run stopped before its first optimizer step (so it trained nothing)."""
        return self.status in BEFORE_START


class AuditFile(Record):
    """audit.json: one record per dataset (data.pipeline.Audit.to_record), then TRL's view of preference data."""

    datasets: list[dict[str, Any]]


def _read(path: Path, model: type[BaseModel]):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: not a {model.__name__} record finetune wrote: {exc.errors()[0]['msg']}") from None


def _write(path: Path, record: BaseModel, *, redacted: bool = False) -> None:
    from finetune.run.checkpoints import write_atomic

    data = record.model_dump(mode="json", exclude_none=True)
    if redacted:
        from finetune.redact import redact

        data = redact(data)
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_summary(run: RunDir) -> Summary | None:
    """The run's summary, or None when it has none (it has not finished)."""
    return _read(run.summary, Summary)


def write_summary(run: RunDir, summary: Summary) -> None:
    """Write summary.json."""
    _write(run.summary, summary)


def read_provenance(path: Path) -> Provenance | None:
    """A provenance.json (a run's, or a merged model's), or None when there is none."""
    return _read(path, Provenance)


def write_provenance(path: Path, provenance: Provenance) -> None:
    """Write a provenance.json, redacted."""
    _write(path, provenance, redacted=True)


def read_merge_report(merged: MergedDir) -> MergeReport | None:
    """The report of a merged model, or None when the directory holds no finished merge."""
    return _read(merged.report, MergeReport)


def write_merge_report(merged: MergedDir, report: MergeReport) -> None:
    """Write merge_report.json (last: its presence marks a finished merge)."""
    _write(merged.report, report)


def read_audit(run: RunDir) -> AuditFile | None:
    """The run's audit (files from before the version field held a bare list)."""
    try:
        data = json.loads(run.audit.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{run.audit}: not readable: {exc}") from None
    return AuditFile.model_validate({"datasets": data} if isinstance(data, list) else data)


def write_audit(run: RunDir, datasets: list[dict[str, Any]]) -> None:
    """Write audit.json with one record per dataset."""
    _write(run.audit, AuditFile(datasets=datasets))


def append_audit(run: RunDir, record: dict[str, Any]) -> None:
    """Add one record to audit.json (TRL's tokenisation of preference data, known only once the trainer is built)."""
    audit = read_audit(run) or AuditFile(datasets=[])
    write_audit(run, [*audit.datasets, record])


def content_sha256(directory: Path) -> str:
    """One sha256 over the files of an adapter or model directory (names and bytes; the model card aside).

    The model card is left out because it is rewritten after training (with the final metrics)
    without changing what the directory computes.
    """
    from finetune.data.sources import sha256_file

    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name == MODEL_CARD and path.parent == directory:
            continue
        digest.update(f"{path.relative_to(directory).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()
