"""Training order that resumes exactly, from epoch-end and from mid-epoch checkpoints.

``EpochShuffle`` orders an epoch by a permutation seeded with ``seed + epoch`` (Lightning calls ``set_epoch``), so an
epoch's order never depends on the process's random state. ``ResumableLoader`` gives Lightning the
``state_dict``/``load_state_dict`` pair it saves in checkpoints: the number of batches the training loop has
taken in the current epoch. On resume the sampler skips exactly those examples once, and the loop carries on with
the next batch of the same permutation. The count comes from the datamodule's ``on_before_batch_transfer``, which
runs once per batch the loop consumes; counting in the iterator would be off by Lightning's prefetched batch.
Single-process only: under a distributed sampler Lightning owns the order (epoch-end resumes stay exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler


class EpochShuffle(RandomSampler):
    """A random order that depends only on ``seed`` and the epoch.

    Args:
        data_source: The dataset.
        seed: Base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # examples of the next epoch already trained on before a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        skip, self.skip = self.skip, 0
        yield from order[skip:]


class ResumableLoader(DataLoader):
    """A DataLoader whose position within the epoch is saved in Lightning checkpoints.

    ``consumed`` is incremented by the owning datamodule for every training batch the loop takes.
    """

    consumed = 0

    def __iter__(self):
        if not getattr(self, "_resuming", False):
            self.consumed = 0
        self._resuming = False
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        epoch = getattr(self.sampler, "epoch", 0)
        return {"epoch": epoch, "consumed_batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochShuffle):
            return  # a distributed sampler replaced ours: Lightning resumes it at the epoch boundary
        self.consumed = state["consumed_batches"]
        self.sampler.skip = self.consumed * self.batch_size
        self._resuming = True
