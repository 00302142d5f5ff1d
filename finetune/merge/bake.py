"""Merge stage: bake an adapter into its base, save in the base's dtype, and verify the result.

The merge runs in float32 on the base reloaded unquantised (also for QLoRA adapters: merging
into 4-bit weights would round the update away), then casts once to the output dtype.
The saved files are reloaded and their logits compared with the adapter model's, so the
report describes what is on disk, not what was in memory. The comparison gates: a merge over
the limits of its dtype (GATES) exits non-zero and leaves nothing behind, since the model is
written to a temporary sibling directory and renamed into place only when it passes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import UserError
from finetune.logs import quiet_libraries, stderr
from finetune.merge.checks import check_adapter_matches_base, check_adapter_type, check_base_unquantised
from finetune.merge.mergeable import init_of_run, refuse_unmergeable
from finetune.model.vocab import fit_embeddings
from finetune.run.layout import RunDir

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
    adapter_kind: str  # lora or qlora
    allow_pickle: bool = False  # the run's model.allow_pickle_weights: else only safetensors bases load


def locate(source: Path) -> MergeSource:
    """Find the adapter and its base from a run directory or an adapter directory."""
    if not source.exists():
        raise UserError(f"{source}: no such run or adapter directory")
    recipe_file = source / "recipe.yaml"
    if recipe_file.is_file():
        from finetune.model.start import adapter_base
        from finetune.recipe import recipe_from_dict

        recipe = recipe_from_dict(yaml.safe_load(recipe_file.read_text(encoding="utf-8")), str(recipe_file))
        if recipe.adapter.kind == "full":
            raise UserError(
                f"{source}: this run trained the full model (adapter.kind: full); {source / 'model'} is already "
                "a complete model that transformers loads as is, so there is nothing to merge"
            )
        adapter_dir = source / "adapter"
        refuse_unmergeable(source, adapter_dir, kind=recipe.adapter.kind, init=getattr(recipe.adapter, "init", None))
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(
                f"{source}: no adapter in {adapter_dir}; did the run finish? (see {source}/metrics.jsonl)"
            )
        check_adapter_type(adapter_dir)
        # A run that kept training an earlier run's adapter sits on that run's base, not on model.path.
        return MergeSource(
            adapter_dir, adapter_base(recipe).base, source, recipe.adapter.kind, recipe.model.allow_pickle_weights
        )
    config_file = source / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        refuse_unmergeable(source, source, peft_type=config.get("peft_type"), init=init_of_run(source))
        check_adapter_type(source)
        base = config.get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"{config_file}: base_model_name_or_path is not set; cannot tell which base to merge into"
            )
        kind = "qlora" if _trained_quantised(source) else "lora"
        return MergeSource(source, base, None, kind)
    raise UserError(
        f"{source}: neither a run directory (no recipe.yaml) nor an adapter directory (no adapter_config.json)"
    )


def _trained_quantised(adapter_dir: Path) -> bool:
    recipe = adapter_dir.parent / "recipe.yaml"
    return recipe.is_file() and "kind: qlora" in recipe.read_text(encoding="utf-8")


class MergeCheckFailed(UserError):
    """The saved merge is further from the adapter model than its dtype's limits (nothing was kept)."""


def run_merge(
    source: Path, *, out: Path | None = None, dtype: str | None = None, max_shard_size: str = "5GB", log=None,
    keep_failed: bool = False,
) -> Path:
    """Merge, save (sharded safetensors with an index past `max_shard_size`), verify and gate; return the output dir.

    The model is written to a temporary sibling of `out` and renamed to `out` only if it passes GATES (or
    `keep_failed`); otherwise MergeCheckFailed says by how much it missed and what to try.
    """
    log = log or stderr
    found = locate(source)
    out = out or ((found.run_dir / "merged") if found.run_dir else source.with_name(source.name + "-merged"))
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UserError(
            f"--out: {out} already exists and is not empty; choose another --out (nothing was written)"
        )

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
    final, out = out, out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    try:
        out.mkdir(parents=True)
        merged.save_pretrained(out, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(out)
        del merged, model, base
        report = _verify(out, found, inputs, reference, reference_text, tokenizer, prompts, _name(base_dtype))
        report["gate"] = _gate(report)
        (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if report["gate"]["passed"] or keep_failed:
            _carry(out, report, found)
            out.rename(final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    _log_report(final, report, prompts, log)
    if not report["gate"]["passed"]:
        raise MergeCheckFailed(
            f"the merge is further from the adapter model than {report['saved_dtype']} allows: "
            + "; ".join(report["gate"]["failed"])
            + (f". Kept anyway in {final} (--keep-failed)" if keep_failed else f". Nothing was written to {final}")
            + ". Try: --dtype float32 (no rounding), check the adapter loads on this base (finetune chat), or "
            "--keep-failed to keep the result and inspect merge_report.json"
        )
    return final


def _verify(out: Path, found: MergeSource, inputs, reference, reference_text, tokenizer, prompts, base_dtype) -> dict:
    """The saved model, reloaded, against the adapter model: logits at attended positions and greedy text."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    logits = _logits(reloaded, inputs)
    report = {
        "adapter": str(found.adapter_dir),
        "base": found.base,
        "adapter_kind": found.adapter_kind,
        "merged_into": "base reloaded unquantised in float32"
        + (" (not into the 4-bit weights it trained on)" if found.adapter_kind == "qlora" else ""),
        "base_dtype": base_dtype,
        "saved_dtype": _name(reloaded.dtype),
        **compare_logits(logits, reference, inputs["attention_mask"]),
        "greedy_generations_agree": None,
        "prompts": prompts,
        "merged_generations": _greedy(reloaded, tokenizer, inputs),
        "weight_files": sorted(p.name for p in out.glob("*.safetensors")),
    }
    report["greedy_generations_agree"] = report["merged_generations"] == reference_text
    if found.adapter_kind == "qlora":
        report["vs_trained_4bit_model"] = _distance_to_4bit(found, inputs, logits)
    return report


def compare_logits(logits, reference, mask) -> dict:
    """Max and mean |difference| and the share of positions with the same top token, over attended positions."""
    attended = mask.bool()
    a, b = logits.float()[attended], reference.float()[attended]
    diff = (a - b).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top_token_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def _gate(report: dict) -> dict:
    """Which of the saved dtype's limits (GATES) the report meets."""
    limits = GATES.get(report["saved_dtype"], GATES["float32"])
    failed = [
        f"{key} {report[key]:.3g} (limit {limit})" for key, limit in limits.items()
        if (report[key] < limit if key == "top_token_agreement" else report[key] > limit)
    ]
    return {"limits": limits, "passed": not failed, "failed": failed}


def _distance_to_4bit(found: MergeSource, inputs, merged_logits) -> dict:
    """QLoRA: the merged model against the model as trained (the base in 4-bit with bitsandbytes + the adapter).

    The merge goes into the full-precision base, so it differs from what was trained by the base's 4-bit
    rounding; this measures by how much (reported, not gated: it is the price of a full-precision merge).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = RunDir.at(found.run_dir).read_recipe().adapter if found.run_dir else None
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=getattr(adapter, "quant_type", "nf4"),
        bnb_4bit_use_double_quant=getattr(adapter, "double_quant", True), bnb_4bit_compute_dtype=torch.float32,
    )
    device = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(found.base, quantization_config=quant, device_map=device)
    trained = PeftModel.from_pretrained(base, found.adapter_dir).eval()
    return compare_logits(merged_logits, _logits(trained, inputs.to(trained.device)).cpu(), inputs["attention_mask"])


def _carry(out: Path, report: dict, found: MergeSource) -> None:
    from finetune.run.card import carry_over

    carry_over(out, report, found.run_dir)  # the run's files into out/provenance/, and the model card
    if found.run_dir is not None:
        from finetune.run.provenance import carry_into_merged

        carry_into_merged(found.run_dir, out, report)  # out/provenance.json, with the merge report


def _log_report(out: Path, report: dict, prompts: list[str], log) -> None:
    verdict = "passes" if report["gate"]["passed"] else "FAILS"
    log(
        f"{out} ({report['saved_dtype']}) {verdict} the merge check: logits vs adapter model max abs diff "
        f"{report['max_abs_logit_diff']:.2e}, mean {report['mean_abs_logit_diff']:.2e}, same top token at "
        f"{report['top_token_agreement']:.1%} of positions (limits {report['gate']['limits']}); greedy generations "
        f"agree: {report['greedy_generations_agree']}"
    )
    if "vs_trained_4bit_model" in report:
        q = report["vs_trained_4bit_model"]
        log(f"  vs the 4-bit model as trained: max abs diff {q['max_abs_logit_diff']:.2e}, mean "
            f"{q['mean_abs_logit_diff']:.2e}, same top token at {q['top_token_agreement']:.1%}")
    for prompt, answer in zip(prompts, report["merged_generations"], strict=True):
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
    from finetune.recipe import recipe_from_dict

    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")))
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
