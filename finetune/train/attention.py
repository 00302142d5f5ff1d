"""SDPA attention per packed segment: padding-free and packed batches at the cost of their real rows.

A padding-free (or packed) batch is one row holding several sequences back to back, with position ids that
restart at each. transformers' `sdpa` runs it as one attention over the whole row with a block-diagonal
mask: N² work and an N×N mask for N tokens, where the sequences need only the sum of their own squares,
and a masked SDPA cannot take the fused causal kernel. On a CPU that made a packed step (4 × 512 tokens)
1.7× slower than the peers' packing, which lets rows attend to each other.

`SEGMENT_ATTENTION` is the same SDPA, called once per sequence with `is_causal=True` (what flash-attention's
varlen kernel does on a GPU, which transformers has for flash_attention_2 but not for sdpa). It reads the
sequence boundaries from `cu_seq_lens_q`, which TRL's padding-free collator puts in every batch, or else
from the position ids, so no row ever sees another. Any other batch (padded, or with a cache while
generating) goes to transformers' own sdpa path unchanged. tests/test_speed.py checks loss and gradients
against the padded batch.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices, sdpa_mask

SEGMENT_ATTENTION = "finetune_sdpa_segments"

# Every layer of one forward gets the same boundaries tensor: read it off once (a device sync on a GPU).
_last: tuple[torch.Tensor | None, list[list[int]] | None] = (None, None)


def segment_mask(*args, attention_mask=None, q_length: int, kv_length: int, **kwargs):
    """No mask for a batch without padding (segment_attention finds the sequences); sdpa's mask otherwise."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers attention function: causal SDPA per sequence of a padding-free row, sdpa otherwise."""
    segments = None
    if attention_mask is None and query.shape[2] == key.shape[2] > 1:
        segments = _segments(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), query.shape[0])
    # Boundaries that do not cover the row (PEFT's prompt tuning prepends virtual tokens the collator never saw)
    # cannot say where sequences lie: sdpa's own path then runs, as it would without this module.
    if segments is not None and any(sum(lengths) != query.shape[2] for lengths in segments):
        segments = None
    if segments is None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    rows = []
    for b, lengths in enumerate(segments):
        # Sequence-major views ([1, tokens, heads, dim]), the layout transformers wants back: the per-sequence
        # outputs are concatenated straight into it (~8% less attention time than splitting and concatenating
        # the head-major tensors and transposing the result).
        q, k, v = (t[b:b + 1].transpose(1, 2) for t in (query, key, value))
        parts = [_causal(*qkv, dropout, scaling, gqa)
                 for qkv in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)]
        rows.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, 0) if len(rows) > 1 else rows[0]
    return out.contiguous(), None


def _causal(q, k, v, dropout, scaling, gqa):
    """Causal SDPA of one sequence, taking and giving [1, tokens, heads, dim]."""
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, scale=scaling, is_causal=True,
        enable_gqa=gqa).transpose(1, 2)


def _segments(cu_seq_lens, position_ids, batch: int) -> list[list[int]] | None:
    """Sequence lengths per row, or None when every row is one sequence (plain causal SDPA is right)."""
    global _last
    if cu_seq_lens is not None and batch == 1:
        if _last[0] is not cu_seq_lens:
            _last = (cu_seq_lens, [cu_seq_lens.diff().tolist()])
        return _last[1]
    if position_ids is None:
        return None
    if _last[0] is not position_ids:
        ids = find_packed_sequence_indices(position_ids.expand(batch, -1))  # None: no row is packed
        lengths = None if ids is None else [torch.bincount(row).tolist() for row in ids]
        _last = (position_ids, lengths)
    return _last[1]


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, segment_mask)


def use_segment_attention(model) -> bool:
    """Switch a model that runs sdpa to SEGMENT_ATTENTION; returns whether it did (config.json is unaffected).

    Only models whose every layer attends causally to all earlier tokens: a sliding window or chunked
    attention would need the mask this path leaves out, so those keep sdpa's (slower, exact) masked path.
    """
    config = model.config.get_text_config()
    plain = (getattr(config, "is_causal", True)
             and getattr(config, "sliding_window", None) is None
             and getattr(config, "attention_chunk_size", None) is None
             and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ()))
    if model.config._attn_implementation != "sdpa" or not plain:
        return False
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True
