"""Length-grouped row order that `--resume` replays: a pure function of (seed, epoch, row lengths).

transformers' `LengthGroupedSampler` draws its shuffle from the global torch RNG when an epoch starts. A
resumed run restores that RNG from the checkpoint, which was saved mid-epoch, after dropout had used it,
so the resumed epoch got another order than the interrupted one and the run landed elsewhere. Here the
generator is seeded from (seed, epoch) each time an epoch's order is drawn; the Trainer tells the sampler
its epoch (`set_epoch`, also on resume) before iterating, and skips the batches already trained.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochLengthGroupedSampler(Sampler[int]):
    """Row indices in megabatches of similar length (transformers' grouping), the same order for a given epoch.

    Args:
        lengths: Token count of every row.
        group_size: Rows per optimizer step on one process (micro batch × gradient accumulation).
        seed: The run's data seed.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths = lengths
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate's data loader) before each epoch's iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        # hash() of a tuple of ints is fixed across processes and Python runs (only str hashing is salted)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))
