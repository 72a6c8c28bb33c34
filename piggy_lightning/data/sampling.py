"""Training order that resumes exactly: torchdata's ``StatefulDataLoader`` over an epoch-seeded, rank-sharded shuffle.

The training loader is a ``torchdata.stateful_dataloader.StatefulDataLoader`` whose sampler is :class:`EpochShuffle`:
epoch ``e`` is ``torch.randperm`` under ``torch.Generator().manual_seed(seed + e)`` (torch's ``DistributedSampler``
order; Lightning calls ``set_epoch``), split over the data-parallel ranks. The order depends only on the seed, the
epoch and the world size, never on the process's random state, and Lightning leaves the sampler in place under DDP
(it is a ``DistributedSampler`` already). Lightning saves the loader's ``state_dict()`` in every checkpoint and loads
it into the rebuilt loader before its first batch; the state holds the sampler's position (and, with workers, their
snapshots), so a mid-epoch resume carries on with the next batch of the same permutation.

:class:`EpochShuffle` adds two things to torchdata's ``StatefulDistributedSampler``. Its epoch is part of its state:
with workers, indices are drawn as soon as the iterator is made, before Lightning's ``set_epoch``. And a position at
the end of an epoch resumes at the start of the next one: torchdata would skip a whole epoch after a checkpoint saved
at an epoch's last batch (``every_n_train_steps`` a multiple of the epoch length; meta-pytorch/data#1437).

A loader built before the checkpoint restores the loops never receives the saved position (Lightning #20550:
``trainer.estimated_stepping_batches`` in ``configure_optimizers`` builds it); ``ChatSFTDataModule`` therefore also
keeps the position in its own state, and :func:`check_position_restored` turns a position that did not arrive into
an error.
"""

from __future__ import annotations

from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler


class EpochShuffle(StatefulDistributedSampler):
    """A random order that depends only on ``seed`` and the epoch, split over ``num_replicas`` ranks.

    Args:
        data_source: The dataset.
        seed: Base seed; epoch ``e`` uses ``seed + e``.
        num_replicas: Data-parallel ranks (Lightning's ``trainer.distributed_sampler_kwargs``).
        rank: This process's rank among them.
    """

    def __init__(self, data_source: Any, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        super().load_state_dict(state_dict)
        self.epoch = state_dict.get("epoch", self.epoch)
        if self.next_yielded is not None and self.next_yielded >= self.num_samples:  # the epoch was finished
            self.next_yielded, self.epoch = None, self.epoch + 1


def _position(state: dict[str, Any]) -> int:
    """Batches a ``StatefulDataLoader`` state has yielded in its epoch (single-process or worker states)."""
    if "_num_yielded" in state:
        return state["_num_yielded"]
    return state.get("_snapshot", {}).get("_snapshot_step", 0) + state.get("_steps_since_snapshot", 0)


def check_position_restored(loaders: Any, saved: list[dict[str, Any]], epoch_batches: float, epoch: int) -> None:
    """Raise if a mid-epoch checkpoint's position did not reach its ``StatefulDataLoader``.

    Args:
        loaders: ``trainer.train_dataloader`` at train start (a loader, or a list or dict of them).
        saved: The checkpoint's ``loops.fit_loop.state_dict.combined_loader`` (one state per stateful loader).
        epoch_batches: Batches per epoch (``trainer.num_training_batches``); a checkpoint that consumed that many
            is an epoch-end one, after which the next epoch rightly starts from its first batch.
        epoch: The epoch the checkpoint resumes (``trainer.current_epoch``), for the message.
    """
    loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    stateful = [loader for loader in loaders if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")]
    for loader, state in zip(stateful, saved, strict=False):
        if not isinstance(loader, StatefulDataLoader) or not state:
            continue
        want = _position(state)
        if 0 < want < epoch_batches and _position(loader.state_dict()) != want:
            raise RuntimeError(
                f"the checkpoint resumes {want} batches into epoch {epoch}, but the train dataloader starts the "
                "epoch over: it was built before the checkpoint was restored (trainer.estimated_stepping_batches in "
                "configure_optimizers, Lightning #20550) and did not get the position from its datamodule's own "
                "state (ChatSFTDataModule keeps it, except under strategies that restore checkpoints after setup, "
                "such as FSDP and DeepSpeed); resume from an epoch-end checkpoint, or keep the position in the "
                "datamodule's state_dict as ChatSFTDataModule does"
            )
