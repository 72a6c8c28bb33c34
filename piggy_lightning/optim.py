"""Learning-rate schedules over a fit's optimizer steps, built from the libraries' own schedulers.

A :class:`Schedule` is a typed config component: ``PiggyModule.configure_optimizers`` calls it with the optimizer and
the trainer's estimated number of optimizer steps (``trainer.estimated_stepping_batches``, which accounts for
gradient accumulation, devices, ``max_steps`` and ``limit_train_batches``) and steps the scheduler it returns every
optimizer step. :class:`CosineWithWarmup` is the schedule of the released TReFT configs (cosine with 5 warmup steps).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class Schedule(ABC):
    """A learning-rate schedule over ``total_steps`` optimizer steps."""

    @abstractmethod
    def __call__(self, optimizer: Optimizer, total_steps: int) -> LRScheduler:
        """The scheduler of ``optimizer`` for a fit of ``total_steps`` optimizer steps."""


class CosineWithWarmup(Schedule):
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` times the base learning rate.

    At optimizer step ``s`` of ``T`` the learning rate is the base rate times ``s / w`` during the ``w`` warmup steps,
    then ``m + (1 - m) * (1 + cos(pi * (s - w) / (T - w))) / 2`` with ``m = min_lr_ratio``: transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup`` (a ``LambdaLR``).

    Args:
        warmup_steps: Optimizer steps of linear warmup.
        min_lr_ratio: Final learning rate as a fraction of the base learning rate.
    """

    def __init__(self, warmup_steps: int = 5, min_lr_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, optimizer: Optimizer, total_steps: int) -> LambdaLR:
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, self.warmup_steps, total_steps, min_lr_rate=self.min_lr_ratio
        )
