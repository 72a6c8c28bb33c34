"""Training order that resumes exactly, from epoch-end and from mid-epoch checkpoints.

``EpochShuffle`` orders an epoch by a permutation seeded with ``seed + epoch`` (Lightning calls ``set_epoch``), so an
epoch's order never depends on the process's random state. ``ResumableLoader`` gives Lightning the
``state_dict``/``load_state_dict`` pair it saves in checkpoints: the number of batches the training loop has
taken in the current epoch. On resume the sampler skips exactly those examples once, and the loop carries on with
the next batch of the same permutation. The count comes from the datamodule's ``on_before_batch_transfer``, which
runs once per batch the loop consumes; counting in the iterator would be off by Lightning's prefetched batch.
Single-process only: under a distributed sampler Lightning owns the order (epoch-end resumes stay exact).

Lightning hands the saved position to the loader only if the fit loop builds the loader after the checkpoint is
restored; anything that builds it earlier (``trainer.estimated_stepping_batches`` in ``configure_optimizers``,
Lightning #20550) silently restarts the epoch. :func:`check_position_restored` turns that into an error.
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


def check_position_restored(loaders: Any, saved: list[dict[str, Any]], epoch_batches: float) -> None:
    """Raise if a mid-epoch checkpoint's position did not reach its ``ResumableLoader``.

    Args:
        loaders: ``trainer.train_dataloader`` at train start (a loader, or a list or dict of them).
        saved: The checkpoint's ``loops.fit_loop.state_dict.combined_loader`` (one state per loader).
        epoch_batches: Batches per epoch (``trainer.num_training_batches``); a checkpoint that consumed that many
            is an epoch-end one, after which the next epoch rightly starts from its first batch.
    """
    loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    for loader, state in zip(loaders, saved, strict=False):
        if not isinstance(loader, ResumableLoader) or not isinstance(loader.sampler, EpochShuffle):
            continue
        want = (state or {}).get("consumed_batches", 0)
        if 0 < want < epoch_batches and loader.consumed != want:
            raise RuntimeError(
                f"the checkpoint resumes {want} batches into epoch {state.get('epoch')}, but the train dataloader "
                "starts the epoch over: it was built before the checkpoint was restored (e.g. by reading "
                "trainer.estimated_stepping_batches in configure_optimizers or setup, Lightning #20550); read it "
                "in on_train_start instead"
            )
