"""Mixing datasets: a held-out eval fraction, per-dataset weights or sample counts, seeded shuffling.

Every random choice comes from `training.seed` and the dataset's position in the recipe, so the same
recipe always yields the same rows in the same order.
"""

from __future__ import annotations

from finetune.recipe.schema import DatasetSpec


def _rng(seed: int, *stream: int):
    import numpy as np

    return np.random.default_rng([seed, *stream])


def hold_out(dataset, fraction: float, seed: int, index: int):
    """Split off round(fraction x rows) random rows (at least one, if there are two) for eval.

    Rows are chosen by their source, so the pieces of a long text split by max_length stay together.
    """
    import numpy as np

    sources = dataset["source"][:]
    unique = list(dict.fromkeys(sources))
    count = min(len(unique) - 1, max(1, round(fraction * len(unique)))) if len(unique) >= 2 else 0
    chosen = {unique[i] for i in _rng(seed, 0, index).permutation(len(unique))[:count]}
    held = np.array([source in chosen for source in sources], dtype=bool)
    return dataset.select(np.flatnonzero(~held)), dataset.select(np.flatnonzero(held))


def resample(dataset, spec: DatasetSpec, seed: int, index: int):
    """Rows of one dataset per epoch: `samples` of them, or `weight` x its rows (repeats, then a random rest)."""
    rows = len(dataset)
    target = spec.samples if spec.samples is not None else round(spec.weight * rows)
    if rows == 0 or target == rows:
        return dataset
    repeats, rest = divmod(target, rows)
    extra = sorted(_rng(seed, 1, index).choice(rows, size=rest, replace=False).tolist())
    return dataset.select(list(range(rows)) * repeats + extra)


def concatenate_and_shuffle(parts: list, seed: int | None):
    """One dataset of all parts; shuffled (rows of different datasets interleaved) when a seed is given."""
    import datasets

    parts = [part for part in parts if len(part)] or parts[:1]
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return merged.shuffle(seed=seed) if seed is not None else merged
