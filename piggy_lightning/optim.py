"""Learning-rate schedules that need the trainer's step count.

``WarmupCosineLR`` is the schedule of the released TReFT configs (cosine with 5 warmup steps). Its
``total_steps`` may stay None in YAML: ``PiggyModule.on_train_start`` fills in the trainer's estimated number of
optimizer steps, which already accounts for gradient accumulation, devices and ``max_steps``. It is filled at train
start, not at construction, because estimating it earlier builds the train dataloader before a checkpoint restores
its position (Lightning #20550); torch's and transformers' schedules need the total at construction, so they cannot
wait. The factor of step 0 does not depend on the total, and the total is part of the scheduler's state dict, so a
resumed run keeps the total it started with.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` times the base learning rate.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Optimizer steps of linear warmup.
        total_steps: Total optimizer steps; None lets ``PiggyModule`` set it from the trainer at train start.
        min_lr_ratio: Final learning rate as a fraction of the base learning rate.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 5, total_steps: int | None = None, min_lr_ratio: float = 0.0
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
