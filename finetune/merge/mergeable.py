"""Which adapters `finetune merge` can fold into the base, and what to tell the user about the others."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError

# What each prompt-learning method learns instead of weight changes (PEFT's peft_type -> words).
_NOT_WEIGHTS = {
    "PROMPT_TUNING": ("prompt tuning", "virtual-token embeddings that are put before every input"),
    "PREFIX_TUNING": ("prefix tuning", "key/value prefixes that every attention layer reads before the input"),
    "P_TUNING": ("p-tuning", "virtual-token embeddings that are put before every input"),
}
_KINDS = {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING"}


def mergeable(kind: str, init: str | None = None) -> bool:
    """Whether a run with this adapter.kind (and adapter.init) has an adapter `finetune merge` can bake in."""
    return kind != "full" and kind not in _KINDS and init != "loftq"


def refuse_unmergeable(source: Path, adapter_dir: Path, *, kind: str | None = None, peft_type: str | None = None,
                       init: str | None = None) -> None:
    """Raise a UserError saying why this adapter cannot be merged and what to do instead; else return.

    Args:
        source: What the user passed to `finetune merge` (named in the message).
        adapter_dir: The adapter directory (for the PeftModel.from_pretrained hint).
        kind: adapter.kind of the run's recipe, when known.
        peft_type: `peft_type` from adapter_config.json, when no recipe is known.
        init: adapter.init of the run's recipe (LoRA family), when known.
    """
    peft_type = _KINDS.get(kind or "", peft_type)
    if peft_type in _NOT_WEIGHTS:
        name, learned = _NOT_WEIGHTS[peft_type]
        raise UserError(
            f"{source}: a {name} adapter cannot be merged: it learns {learned}, not changes to the model's "
            "weights, so there is nothing to fold into them. Use it as it is: load the base and apply it with "
            f"peft.PeftModel.from_pretrained(base, '{adapter_dir}'). For a standalone merged model, train with "
            "adapter.kind: lora (or ia3) instead."
        )
    if init == "loftq":
        raise UserError(
            f"{source}: this adapter was initialised with LoftQ (adapter.init: loftq), so it carries the 4-bit "
            "quantisation error of its base; finetune merge folds adapters into the full-precision base, which "
            "would add that error a second time. Use the adapter on the 4-bit base (PeftModel.from_pretrained on the "
            "base loaded with the run's BitsAndBytesConfig), or train with init: default to get a mergeable adapter."
        )
