"""Prepare a recipe's data once: read, encode, audit, hold out, mix, shuffle, and cache the result.

`prepare_datasets` is the one entry point (train, `finetune data prepare` and `preview` use it). It
does no multi-process coordination itself: in a distributed run, wrap it so that the main process
prepares first and the others find the entry in the cache.
"""

from __future__ import annotations

import json

from finetune.data.cache import cache_key, entry_path, load_entry, store_entry
from finetune.data.formats import CHAT_FORMATS
from finetune.data.pipeline import Audit, check_audits, encode_dataset
from finetune.data.sources import resolve_sources
from finetune.errors import UserError
from finetune.recipe.methods import PREFERENCE_KINDS
from finetune.recipe.schema import Recipe

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def set_chat_template(recipe: Recipe, tokenizer) -> str | None:
    """Set the recipe's chat template on the tokenizer (it is saved with the output) and return it.

    Returns None when the recipe names no template and the tokenizer has none: plain text and string
    prompt/completion rows need no template, and chat rows then fail with a message saying so.
    """
    from finetune.data.templates import resolve_chat_template

    if recipe.data.chat_template is None and not getattr(tokenizer, "chat_template", None):
        chat = [spec for spec in [*recipe.data.train, *recipe.data.eval] if spec.format in CHAT_FORMATS]
        if chat:
            resolve_chat_template(None, tokenizer)  # raises: no template, and how to set one
        return None
    tokenizer.chat_template = resolve_chat_template(recipe.data.chat_template, tokenizer)
    return tokenizer.chat_template


def prepare_datasets(recipe: Recipe, tokenizer, log):
    """Return (train dataset, eval dataset or None, audits) for a recipe, from the cache when it can.

    SFT rows have `input_ids`, `labels` (-100 where no loss) and `source` ("file:line"); preference
    rows have `prompt`, `chosen`, `rejected` and `source`. Set the chat template on the tokenizer
    first (`set_chat_template`). Raises UserError for bad data, before any model is loaded.
    """
    data = recipe.data
    template = getattr(tokenizer, "chat_template", None) or None
    date = template_date(recipe, template, log)
    specs = {f"data.train[{i}]": spec for i, spec in enumerate(data.train)}
    specs |= {f"data.eval[{i}]": spec for i, spec in enumerate(data.eval)}
    sources = {key: resolve_sources(spec, key) for key, spec in specs.items()}
    key = cache_key(recipe, tokenizer, template, {k: [s.digest for s in v] for k, v in sources.items()}, date)
    entry = load_entry(key)
    if entry is not None:
        log(f"data: cache hit, nothing to tokenise ({entry_path(key)})")
    else:
        log(f"data: preparing {len(specs)} dataset(s); cache entry {entry_path(key)}")
        train, evaluation, audits = _build(recipe, tokenizer, template, sources, date)
        check_audits(audits, data)  # a dataset that trains nothing is not worth caching
        manifest = {"recipe": recipe.name, "sources": {k: [s.label for s in v] for k, v in sources.items()}}
        store_entry(key, train, evaluation, [a.to_record() for a in audits], manifest)
        entry = load_entry(key)
        assert entry is not None
    train, evaluation, records = entry
    audits = [Audit.from_record(record) for record in records]
    for audit in audits:
        log(describe_audit(audit))
    for warning in check_audits(audits, data):
        log(f"warning: {warning}")
    return train, evaluation, audits


def template_date(recipe: Recipe, template: str | None, log) -> str | None:
    """The date a chat template that prints today's date shows (data.template_date, else today), or None.

    It goes into the cache key and the audit: a cached entry never holds another day's text unseen.
    """
    from finetune.data.render import renders_date, today

    if template is None or not renders_date(template):
        return None
    date = recipe.data.template_date or today()
    if recipe.data.template_date is None:
        log(f"data: the chat template prints today's date; rows show {date} (set data.template_date to pin one)")
    return date


def _build(recipe: Recipe, tokenizer, template, sources, date: str | None = None):
    from finetune.data.mix import concatenate_and_shuffle, hold_out, resample

    data, seed = recipe.data, recipe.training.seed
    preference = recipe.method.kind in PREFERENCE_KINDS  # pairs for DPO, ORPO and KTO (KTO unpairs them later)
    options = dict(
        section=data,
        tokenizer=tokenizer,
        template=template,
        max_length=recipe.training.max_length,
        preference=preference,
        date=date,
    )
    train_parts, eval_parts, audits = [], [], []
    for split, specs in (("train", data.train), ("eval", data.eval)):
        for i, spec in enumerate(specs):
            key = f"data.{split}[{i}]"
            rows, audit = encode_dataset(spec, key, sources[key], **options)
            audit.template_date = date
            if split == "train" and data.eval_fraction is not None:
                rows, held = hold_out(rows, data.eval_fraction, seed, i)
                audit.held_out = len(held)
                eval_parts.append(held)
            rows = resample(rows, spec, seed, i if split == "train" else 1000 + i)
            audit.mixed_rows = len(rows)
            (train_parts if split == "train" else eval_parts).append(rows)
            audits.append(audit)
    train = concatenate_and_shuffle(train_parts, seed)
    evaluation = concatenate_and_shuffle(eval_parts, None) if eval_parts else None
    if preference:
        train = _decode_preference(train, "data.train")
        evaluation = _decode_preference(evaluation, "data.eval") if evaluation is not None else None
    return train, evaluation, audits


def _decode_preference(dataset, key: str):
    """Preference rows with their JSON-text columns decoded (one kind per split, as TRL needs)."""
    import datasets

    rows = [{**{k: json.loads(row[k]) for k in PREFERENCE_KEYS}, "source": row["source"]} for row in dataset]
    kinds = {type(row["prompt"]).__name__ for row in rows}
    if len(kinds) > 1:
        first = {kind: next(r["source"] for r in rows if type(r["prompt"]).__name__ == kind) for kind in kinds}
        raise UserError(
            f"{key}: some preference rows are plain strings and others message lists; DPO needs one kind "
            f"per split (e.g. {first['str']} and {first['list']})"
        )
    return datasets.Dataset.from_list(rows)


def describe_audit(audit: Audit) -> str:
    """One log line per dataset: rows kept and dropped, truncation, trained tokens."""
    trained = (
        f", {audit.trained_tokens}/{audit.tokens} tokens trained ({audit.trained_fraction:.1%})" if audit.tokens else ""
    )
    extra = f", {audit.held_out} held out for eval" if audit.held_out else ""
    extra += f", {audit.mixed_rows} rows per epoch" if audit.mixed_rows != audit.kept - audit.held_out else ""
    dropped = "; ".join(f"{reason}: {e['count']}" for reason, e in audit.dropped.items())
    return (
        f"data {audit.name}: {audit.kept}/{audit.rows} rows kept, {audit.dropped_rows} dropped"
        + (f" ({dropped})" if dropped else "")
        + f", {audit.truncated} truncated{trained}{extra}"
    )
