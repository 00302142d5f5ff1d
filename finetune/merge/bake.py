"""Merge stage: bake an adapter into its base, save in the base's dtype, and verify the result.

The merge runs in float32 on the base reloaded unquantised (also for QLoRA adapters: merging
into 4-bit weights would round the update away), then casts once to the output dtype.
The saved files are reloaded and their logits compared with the adapter model's, so the
report describes what is on disk, not what was in memory. The comparison gates: a merge over
the limits of its dtype (GATES) exits non-zero and leaves nothing behind, since the model is
written to a temporary sibling directory and renamed into place only when it passes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.logs import quiet_libraries, stderr
from finetune.merge.checks import (
    check_adapter_matches_base,
    check_adapter_type,
    check_base_unquantised,
    read_adapter_config,
)
from finetune.merge.mergeable import refuse_unmergeable
from finetune.model.vocab import fit_embeddings
from finetune.run.layout import MergedDir, RunDir
from finetune.run.records import LogitDistance, MergeGate, MergeReport, content_sha256, write_merge_report

# Limits per saved dtype, on the logits of the reloaded merge against the adapter model (fp32) at every attended
# position of the verification prompts. Measured on the tiny model's merges (docs/after-training.md): fp32 max abs
# diff 4.8e-6; bf16 mean 9.0e-3 (max 0.12), fp16 mean 1.2e-3 (max 1.5e-2), top token the same at 100% of
# positions for all three. Half precision rounds every weight, so its max diff grows with the model and its greedy
# text may diverge at a near-tie: gated on the mean and on top-token agreement instead. Limits 10-200x the measured.
GATES = {
    "float32": {"max_abs_logit_diff": 1e-3},
    "bfloat16": {"mean_abs_logit_diff": 0.1, "top_token_agreement": 0.9},
    "float16": {"mean_abs_logit_diff": 0.02, "top_token_agreement": 0.95},
}

VERIFY_PROMPTS = [
    "What is the capital of France?",
    "What is 3 plus 4?",
    "Spell the word cat backwards.",
]


@dataclass
class MergeSource:
    """What to merge: the adapter, the base it belongs to, and the run it came from (if any)."""

    adapter_dir: Path
    base: str
    run_dir: Path | None
    adapter_kind: str  # the run's adapter.kind; for a bare adapter, its PEFT type (lora, qlora, ia3, adalora)
    default_out: Path  # <run>/merged for a run; <dir>-merged next to a checkpoint or adapter directory
    allow_pickle: bool = False  # the run's model.allow_pickle_weights: else only safetensors bases load


def merge_source(source: str | Path) -> MergeSource:
    """Find the adapter and its base (through earlier runs) for a run, checkpoint or adapter directory.

    What the path names is `finetune.run.resolve`'s answer; this adds merge's refusals: a fully
    fine-tuned model has nothing to merge, prompt learning and LoftQ adapters cannot be merged.
    """
    from finetune.run.resolve import resolve

    found = resolve(str(source), local=True)
    if found.kind in ("run", "checkpoint"):
        recipe = found.recipe
        if found.adapter is None:
            raise UserError(
                f"{source}: this run trained the full model (adapter.kind: full); {found.weights} is already "
                "a complete model that transformers loads as is, so there is nothing to merge"
            )
        refuse_unmergeable(source, found.adapter, kind=recipe.adapter.kind, init=getattr(recipe.adapter, "init", None))
        check_adapter_type(found.adapter)
        # A run that kept training an earlier run's adapter sits on that run's base, not on model.path.
        default_out = found.run.merged.root if found.kind == "run" else _beside(source)
        return MergeSource(found.adapter, found.weights, found.run.root, recipe.adapter.kind, default_out,
                           recipe.model.allow_pickle_weights)
    if found.kind == "adapter":
        config = read_adapter_config(found.adapter)
        refuse_unmergeable(source, found.adapter, peft_type=config.get("peft_type"))
        check_adapter_type(found.adapter)
        return MergeSource(found.adapter, found.weights, None, str(config.get("peft_type", "LORA")).lower(),
                           _beside(source))
    raise UserError(
        f"{source}: a complete model ({found.kind}), not an adapter: there is nothing to merge into it; "
        "pass a run directory (from `finetune train`) or an adapter directory"
    )


def _beside(source: str | Path) -> Path:
    source = Path(source)
    return source.with_name(source.name + "-merged")


class MergeCheckFailed(UserError):
    """The saved merge is further from the adapter model than its dtype's limits (nothing was kept)."""


def run_merge(
    source: str | Path, *, out: Path | None = None, dtype: str | None = None, max_shard_size: str = "5GB",
    overwrite: bool = False, keep_failed: bool = False, log=None,
) -> Path:
    """Merge, save (sharded safetensors with an index past `max_shard_size`), verify and gate; return the output dir.

    The model is written into a temporary sibling of `out` and renamed into place only once it passes
    GATES (or with `keep_failed`) and its report is written, so `out` never holds half a merge, and an
    earlier merge there is replaced (`overwrite`) only by one that passed; otherwise MergeCheckFailed
    says by how much it missed and what to try.
    """
    log = log or stderr
    found = merge_source(source)
    run = RunDir(found.run_dir) if found.run_dir is not None else None
    out = out or found.default_out
    _check_out(out, overwrite, source)
    adapter_sha256 = content_sha256(found.adapter_dir)  # before loading: what this merge is made from

    quiet_libraries()
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base_config = AutoConfig.from_pretrained(found.base)
    check_base_unquantised(base_config, found.base)
    check_adapter_matches_base(found.adapter_dir, base_config, found.base)
    base_dtype = _config_dtype(base_config)
    save_dtype = getattr(torch, dtype) if dtype else base_dtype
    tokenizer = AutoTokenizer.from_pretrained(found.adapter_dir)
    log(f"merging {found.adapter_dir} into {found.base} (base dtype {_name(base_dtype)}, merge in float32)")
    base = AutoModelForCausalLM.from_pretrained(
        found.base, dtype=torch.float32, use_safetensors=None if found.allow_pickle else True
    )
    fit_embeddings(base, tokenizer)  # tokens added in training: the adapter holds rows the base lacks
    model = PeftModel.from_pretrained(base, found.adapter_dir).eval()
    prompts = verify_prompts(found.run_dir, log)
    inputs = _verify_inputs(tokenizer, prompts)
    reference = _logits(model, inputs)
    reference_text = _greedy(model, tokenizer, inputs)

    merged = model.merge_and_unload().to(save_dtype)
    merged.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; renamed into place, it is a directory like any other
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        del merged, model, base
        report = _verify(tmp, found, adapter_sha256, _name(base_dtype), tokenizer, inputs, reference, reference_text,
                         prompts)
        if report.gate.passed or keep_failed:
            _finish(tmp, report, found, run)
            if MergedDir(out).exists():  # _check_out allowed it: an earlier merge, replaced as a whole
                log(f"--overwrite: replacing the earlier merge in {out}")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log_report(out, report, prompts, log)
    if not report.gate.passed:
        raise MergeCheckFailed(
            f"the merge is further from the adapter model than {report.saved_dtype} allows: "
            + "; ".join(report.gate.failed)
            + (f". Kept anyway in {out} (--keep-failed)" if keep_failed else f". Nothing was written to {out}"
               + (" (the earlier merge there is untouched)" if MergedDir(out).exists() else ""))
            + ". Try: --dtype float32 (no rounding), or check the adapter loads on this base (finetune chat)"
            + ("" if keep_failed else "; --keep-failed keeps the result to inspect (merge_report.json)")
        )
    return out


def _check_out(out: Path, overwrite: bool, source: Path) -> None:
    """Refuse to write over anything but an earlier merge, and over that only with --overwrite."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not MergedDir(out).exists():
        raise UserError(
            f"--out: {out} already exists and is not a merge written by finetune merge; choose another --out "
            "(nothing was written)"
        )
    if not overwrite:
        raise UserError(
            f"--out: {out} already holds a merge; pass --overwrite to replace it "
            f"(finetune merge {source} --overwrite), or choose another --out (nothing was written)"
        )


def _verify(out: Path, found: MergeSource, adapter_sha256: str, base_dtype: str, tokenizer, inputs, reference,
            reference_text, prompts) -> MergeReport:
    """The saved model, reloaded, against the adapter model (logits at attended positions, greedy text), gated."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    logits = _logits(reloaded, inputs)
    distance = compare_logits(logits, reference, inputs["attention_mask"])
    merged_text = _greedy(reloaded, tokenizer, inputs)
    saved_dtype = _name(reloaded.dtype)
    return MergeReport(
        adapter=str(found.adapter_dir.resolve()),
        adapter_sha256=adapter_sha256,
        base=found.base,
        adapter_kind=found.adapter_kind,
        merged_into="base reloaded unquantised in float32"
        + (" (not into the 4-bit weights it trained on)" if found.adapter_kind == "qlora" else ""),
        base_dtype=base_dtype,
        saved_dtype=saved_dtype,
        **distance.model_dump(),
        greedy_generations_agree=merged_text == reference_text,
        gate=gate(distance, saved_dtype),
        vs_trained_4bit_model=_distance_to_4bit(found, inputs, logits) if found.adapter_kind == "qlora" else None,
        prompts=prompts,
        merged_generations=merged_text,
        weight_files=sorted(p.name for p in out.glob("*.safetensors")),
    )


def compare_logits(logits, reference, mask) -> LogitDistance:
    """Max and mean |difference| and the share of positions with the same top token, over attended positions."""
    attended = mask.bool()
    a, b = logits.float()[attended], reference.float()[attended]
    diff = (a - b).abs()
    return LogitDistance(
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        top_token_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    )


def gate(distance: LogitDistance, saved_dtype: str) -> MergeGate:
    """Which of the saved dtype's limits (GATES) the distance meets."""
    limits = GATES.get(saved_dtype, GATES["float32"])
    values = distance.model_dump()
    failed = [
        f"{key} {values[key]:.3g} (limit {limit})" for key, limit in limits.items()
        if (values[key] < limit if key == "top_token_agreement" else values[key] > limit)
    ]
    return MergeGate(limits=limits, passed=not failed, failed=failed)


def _distance_to_4bit(found: MergeSource, inputs, merged_logits) -> LogitDistance:
    """QLoRA: the merged model against the model as trained (the base in 4-bit with bitsandbytes + the adapter).

    The merge goes into the full-precision base, so it differs from what was trained by the base's 4-bit
    rounding; this measures by how much (reported, not gated: it is the price of a full-precision merge).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.model.load import keep_4bit_training_kernel

    adapter = RunDir(found.run_dir).read_recipe().adapter if found.run_dir else None
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=getattr(adapter, "quant_type", "nf4"),
        bnb_4bit_use_double_quant=getattr(adapter, "double_quant", True), bnb_4bit_compute_dtype=torch.float32,
    )
    device = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(found.base, quantization_config=quant, device_map=device)
    keep_4bit_training_kernel(base)  # the kernel training computed with, not bitsandbytes' bf16 inference one
    trained = PeftModel.from_pretrained(base, found.adapter_dir).eval()
    return compare_logits(merged_logits, _logits(trained, inputs.to(trained.device)), inputs["attention_mask"])


def _finish(out: Path, report: MergeReport, found: MergeSource, run: RunDir | None) -> None:
    """Give the merge its card and the run's provenance, then the report (last: it marks a finished merge)."""
    from finetune.run.card import carry_over

    carry_over(out, report, found.run_dir)  # the run's files into out/provenance/, the card
    if run is not None:
        from finetune.run.provenance import carry_into_merged

        carry_into_merged(run, MergedDir(out), report)  # out/provenance.json, with the merge report
    write_merge_report(MergedDir(out), report)


def _log_report(out: Path, report: MergeReport, prompts: list[str], log) -> None:
    verdict = "passes" if report.gate.passed else "FAILS"
    log(
        f"{out} ({report.saved_dtype}) {verdict} the merge check: logits vs adapter model max abs diff "
        f"{report.max_abs_logit_diff:.2e}, mean {report.mean_abs_logit_diff:.2e}, same top token at "
        f"{report.top_token_agreement:.1%} of positions (limits {report.gate.limits}); greedy generations "
        f"agree: {report.greedy_generations_agree}"
    )
    if (q := report.vs_trained_4bit_model) is not None:
        log(f"  vs the 4-bit model as trained: max abs diff {q.max_abs_logit_diff:.2e}, mean "
            f"{q.mean_abs_logit_diff:.2e}, same top token at {q.top_token_agreement:.1%}")
    for prompt, answer in zip(prompts, report.merged_generations, strict=True):
        log(f"  {prompt!r} -> {answer!r}")


def _config_dtype(config):
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(value, str):
        value = getattr(torch, value, torch.float32)
    return value


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def verify_prompts(run_dir: Path | None, log, limit: int = 3) -> list[str]:
    """The first user turns of the run's eval data (messages rows), then a fixed set of prompts."""
    if run_dir is None:
        return VERIFY_PROMPTS
    from finetune.data.sources import read_rows

    recipe = RunDir(run_dir).read_recipe()
    prompts: list[str] = []
    for i, spec in enumerate(s for s in recipe.data.eval if s.format == "messages"):
        try:
            rows = read_rows(spec, f"data.eval[{i}]")
        except UserError as exc:  # eval data moved since training: still merge, on the fixed prompts
            log(f"note: verifying on fixed prompts, the run's eval data cannot be read: {exc}")
            return VERIFY_PROMPTS
        for row in rows:
            user = next((m.get("content") for m in row.data.get("messages") or [] if m.get("role") == "user"), None)
            if isinstance(user, str) and user.strip() and len(prompts) < limit:
                prompts.append(user)
    return prompts + VERIFY_PROMPTS


def _verify_inputs(tokenizer, prompts: list[str]):
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched generation pads on the left
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side  # the saved tokenizer keeps the user's setting


def _logits(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def _greedy(model, tokenizer, inputs, max_new_tokens: int = 24) -> list[str]:
    import torch

    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
