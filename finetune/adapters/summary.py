"""What a run trains: parameters trainable and total, overall and per module type.

PEFT's `print_trainable_parameters` gives one line; this groups parameters by the kind of module
that holds them (q_proj.lora_A, embed_tokens.modules_to_save, prompt_encoder.embedding, ...) so a
target that matched less than intended is visible before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Name parts that say which part of a PEFT layer holds a parameter; kept together with the module name.
_PEFT_PARTS = {
    "lora_A",
    "lora_B",
    "lora_E",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "ia3_l",
    "modules_to_save",
    "original_module",
    "base_layer",
    "ranknum",
}
_ADAPTER_NAME = "default"


@dataclass
class ParameterCounts:
    """Trainable and total parameter counts, overall and per module type and part."""

    trainable: int = 0
    total: int = 0
    by_module: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # module -> part -> [trained, total]

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0


def module_type(name: str) -> tuple[str, str]:
    """Module type and PEFT part of a parameter name ("" for a weight of the module itself).

    'base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight' -> ('q_proj', 'lora_A').
    """
    parts = [p for p in name.split(".") if not p.isdigit() and p != _ADAPTER_NAME]
    if parts and parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    if "prompt_encoder" in parts and parts[-1] != "prompt_encoder":
        return "prompt_encoder", parts[-1]
    if len(parts) > 1 and parts[-1] in _PEFT_PARTS:
        return parts[-2], parts[-1]
    return (parts[-1] if parts else name), ""


def count_parameters(model) -> ParameterCounts:
    """Count every parameter once (shared ones too), 4-bit weights at their unpacked size."""
    counts = ParameterCounts()
    for name, param in model.named_parameters():
        n = _numel(param)
        module, part = module_type(name)
        row = counts.by_module.setdefault(module, {}).setdefault(part, [0, 0])
        row[1] += n
        counts.total += n
        if param.requires_grad:
            row[0] += n
            counts.trainable += n
    return counts


def _numel(param) -> int:
    # bitsandbytes packs two 4-bit values per byte of its storage dtype (as PEFT counts them)
    if param.__class__.__name__ == "Params4bit":
        quant_storage = getattr(param, "quant_storage", None)
        width = quant_storage.itemsize if quant_storage is not None else 1
        return param.numel() * 2 * width
    return getattr(param, "ds_numel", param.numel())  # under ZeRO-3 a parameter holds only its shard


def summary_lines(counts: ParameterCounts) -> list[str]:
    """A headline, one row per module type that trains (split into its trained parts), one row of the frozen."""
    lines = [f"trainable parameters: {counts.trainable:,} of {counts.total:,} ({counts.percent:.4g}%)"]
    rows, frozen = [], []
    for module, parts in counts.by_module.items():  # in model order
        trained = sum(t for t, _ in parts.values())
        total = sum(n for _, n in parts.values())
        if not trained:
            frozen.append((module, total))
            continue
        split = [f"{part} {t:,}" for part, (t, _) in parts.items() if t and part]
        rows.append((module, trained, total, " + ".join(split)))
    width = max([len(r[0]) for r in rows] + [len("module type")])
    lines.append(f"  {'module type':<{width}}  {'trainable':>12}  {'of total':>12}  trained parts")
    lines += [f"  {m:<{width}}  {t:>12,}  {n:>12,}  {split}".rstrip() for m, t, n, split in rows]
    if frozen:
        lines.append(f"  frozen: {', '.join(m for m, _ in frozen)} ({sum(n for _, n in frozen):,} parameters)")
    return lines
