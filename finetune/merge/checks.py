"""Refusals before a merge: cases where `merge_and_unload` would run but give a wrong model.

Each check reads only JSON and safetensors headers (and builds the base on the meta device), so a
refusal comes before any weight is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import UserError

MERGEABLE = {"LORA", "ADALORA", "IA3"}  # methods that add (or scale) weights merge_and_unload can fold in


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's adapter_config.json as a dict."""
    path = adapter_dir / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the adapter config: {exc}") from None


def check_adapter_type(adapter_dir: Path) -> None:
    """Only weight-changing adapters can be baked into the base (prompt learning is refused earlier, with
    its reason, by adapters.mergeable.refuse_unmergeable)."""
    peft_type = str(read_adapter_config(adapter_dir).get("peft_type", "LORA")).upper()
    if peft_type not in MERGEABLE:
        raise UserError(
            f"{adapter_dir}: finetune merges {', '.join(sorted(MERGEABLE))} adapters; this one is {peft_type}. "
            "Use it unmerged: PeftModel.from_pretrained(base, adapter dir), or `finetune chat --adapter`"
        )


def check_base_unquantised(base_config, base: str) -> None:
    """A GPTQ/AWQ/… base holds packed integer weights: a LoRA delta cannot be added to them."""
    quant = getattr(base_config, "quantization_config", None)
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)
    raise UserError(
        f"{base}: the base model is already quantised ({method}); merging a LoRA delta into quantised weights "
        "re-rounds it away or fails. Merge into the original unquantised model instead (point "
        "base_model_name_or_path in adapter_config.json, or model.path in the recipe, at it), then quantise"
    )


def check_adapter_matches_base(adapter_dir: Path, base_config, base: str) -> None:
    """Compare the adapter's tensor names and shapes with the base's modules, before loading weights."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config)
    modules = dict(skeleton.named_modules())
    params = dict(skeleton.named_parameters())
    embeddings = [skeleton.get_input_embeddings(), skeleton.get_output_embeddings()]
    vocab = {name for name, p in params.items() if any(m is not None and p is m.weight for m in embeddings)}
    problems = []
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            shape = tuple(f.get_slice(key).get_shape())
            problem = _mismatch(key.removeprefix("base_model.model."), shape, modules, params, vocab)
            if problem:
                problems.append(problem)
    if problems:
        arch = ", ".join(getattr(base_config, "architectures", None) or [base_config.model_type])
        raise UserError(
            f"{adapter_dir}: this adapter does not fit the base {base} ({arch}); it was trained on a different "
            "model. Point base_model_name_or_path (or the recipe's model.path) at the base it was trained on",
            problems=problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else []),
        )


def _mismatch(key: str, shape: tuple, modules: dict, params: dict, vocab: set[str]) -> str | None:
    # modules_to_save wrappers ("lm_head.modules_to_save.weight") hold copies of the base parameter
    parts = [p for p in key.split(".") if p not in ("modules_to_save", "original_module")]
    key = ".".join(parts)
    for part in ("ia3_l", "lora_E", "ranknum"):  # IA3 scales, AdaLoRA singular values: per module
        if part in parts:
            name = ".".join(parts[: parts.index(part)])
            return None if name in modules else f"{key}: the base has no module {name}"
    # LoRA saves "x.lora_A.weight", AdaLoRA "x.lora_A" (a bare parameter)
    for part, axis in (("lora_A", 1), ("lora_B", 0), ("lora_embedding_A", 1), ("lora_embedding_B", 0)):
        if part in parts:
            name = ".".join(parts[: parts.index(part)])
            module = modules.get(name)
            if module is None:
                return f"{key}: the base has no module {name}"
            # A is (r, inputs) and B is (outputs, r); for an Embedding inputs = vocabulary, outputs = width
            expected = _features(module, "in" if axis == 1 else "out")
            if expected is not None and shape[axis] != expected:
                side = "inputs" if axis == 1 else "outputs"
                return f"{key}: adapter has {shape[axis]} {side}, base {name} has {expected}"
            return None
    if "lora_magnitude_vector" in key:
        return None
    param = params.get(key)
    if param is None:
        return f"{key}: the base has no parameter {key}"
    if tuple(param.shape) != shape:
        if key in vocab and shape[1:] == tuple(param.shape[1:]) and shape[0] > param.shape[0]:
            return None  # rows of tokens added in training (model.add_special_tokens); merge grows the base
        return f"{key}: adapter shape {list(shape)}, base {list(param.shape)}"
    return None


def _features(module, side: str) -> int | None:
    """Input or output width of a Linear or Embedding module."""
    if hasattr(module, "in_features"):
        return module.in_features if side == "in" else module.out_features
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings if side == "in" else module.embedding_dim
    return None
