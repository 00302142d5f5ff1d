"""New tokens: add them to the tokenizer and grow the model's embeddings to hold them."""

from __future__ import annotations


def add_special_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """Add `tokens` as special tokens (never split, skippable when decoding); return those that were new."""
    if not tokens:
        return []
    known = tokenizer.get_vocab()
    new = [t for t in tokens if t not in known]
    tokenizer.add_special_tokens({"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return new


def fit_embeddings(model, tokenizer, seed: int = 0) -> int | None:
    """Grow the input (and output) embeddings when the tokenizer has more tokens than they have rows.

    Never shrinks: many models ship spare rows (Qwen: 151,936 rows for ~151,665 tokens), and new tokens
    that fit there need no resize. New rows start at the mean of the old ones (transformers'
    `mean_resizing`), so the new tokens begin as an average token rather than noise.
    Used by training and by merge, which must give the base the same shape before loading the adapter.

    Returns:
        The new number of rows, or None when nothing changed.
    """
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the weight is a shard; ds_shape is whole
    if len(tokenizer) <= rows:
        return None
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return len(tokenizer)
