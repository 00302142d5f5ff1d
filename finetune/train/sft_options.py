"""SFT speed options resolved from a recipe (no heavy imports: `finetune plan` uses them too).

See finetune/sft_trainer.py for what each choice does and why the defaults are what they are.
"""

from __future__ import annotations

from finetune.recipe.schema import Recipe


def resolve_batching(recipe: Recipe) -> str:
    """`padded`, `grouped`, `padding_free` or `packed`: what `training.batching: auto` means for this recipe."""
    if recipe.method.kind != "sft":
        return "padded"
    if recipe.method.packing:
        return "packed"
    batching = recipe.training.batching
    if batching == "auto":
        # not "grouped" by default: its sampler draws the order from RNG state a resume does not replay, so a
        # resumed run would not land where an uninterrupted one does (tests/test_lifecycle.py shows it)
        return "padding_free" if recipe.model.attn_implementation == "flash_attention_2" else "padded"
    return batching


def resolve_lm_head(recipe: Recipe, device: str) -> str:
    """`chunked` or `full_logits`; token metrics come from TRL's chunked head."""
    if recipe.training.lm_head == "auto":
        return "chunked" if device == "cuda" or recipe.training.token_metrics else "full_logits"
    return recipe.training.lm_head


def sft_config_kwargs(recipe: Recipe) -> dict:
    """SFTConfig arguments for the recipe's batching; the data is already tokenised, truncated and filtered."""
    batching = resolve_batching(recipe)
    kwargs: dict = {"packing": batching == "packed", "packing_strategy": "bfd"}
    if batching != "packed":
        # TRL's preparation would truncate and filter again, three passes over the data at start-up.
        kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    if batching == "padding_free":
        # TRL refuses padding_free with a max_length it cannot enforce without packing; ours enforced it.
        kwargs |= {"padding_free": True, "max_length": None}
    if batching == "grouped":
        kwargs["train_sampling_strategy"] = "group_by_length"
    return kwargs
