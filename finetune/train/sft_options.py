"""SFT speed options resolved from a recipe (no heavy imports: `finetune plan` uses them too).

See finetune/train/sft.py for what each choice does and why the defaults are what they are.
"""

from __future__ import annotations

from finetune.recipe.schema import Recipe, auto_batching


def resolve_batching(recipe: Recipe) -> str:
    """`padded`, `grouped`, `padding_free` or `packed`: what `training.batching: auto` means for this recipe."""
    if recipe.method.kind != "sft":
        return "padded"
    if recipe.method.packing:
        return "packed"
    batching = recipe.training.batching
    if batching == "auto":
        # padding-free rows cost only their real tokens where attention runs per sequence (flash-attention's
        # varlen kernel, or finetune.train.attention for sdpa); eager and flex attention would mask the whole
        # concatenation instead, so they get length-grouped batches, which carry little padding
        return auto_batching(recipe)
    return batching


def resolve_lm_head(recipe: Recipe, device: str) -> str:
    """`chunked` or `full_logits`; token metrics come from TRL's chunked head."""
    if recipe.training.lm_head == "auto":
        return "chunked" if device == "cuda" or recipe.training.token_metrics else "full_logits"
    return recipe.training.lm_head


def sft_config_kwargs(recipe: Recipe) -> dict:
    """SFTConfig arguments for the recipe's batching; the data is already tokenised, truncated and filtered."""
    batching = resolve_batching(recipe)
    # Liger's layer kernels through transformers' switch; TRL keeps its own chunked head for the loss.
    kwargs: dict = {"packing": batching == "packed", "packing_strategy": "bfd",
                    "use_liger_kernel": recipe.training.kernels == "liger"}
    if batching != "packed":
        # TRL's preparation would truncate and filter again, three passes over the data at start-up.
        kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    if batching == "padding_free":
        # TRL refuses padding_free with a max_length it cannot enforce without packing; ours enforced it.
        kwargs |= {"padding_free": True, "max_length": None}
    if batching == "grouped":
        kwargs["train_sampling_strategy"] = "group_by_length"
    return kwargs
