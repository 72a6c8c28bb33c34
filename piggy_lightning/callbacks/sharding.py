"""How a callback's evaluation is shared among the trainer's processes (see ``evaluation/shard.py``)."""

from __future__ import annotations

import hashlib

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from piggy_lightning.evaluation.identity import weights_digest
from piggy_lightning.evaluation.shard import Shard


def shard_of(trainer: L.Trainer) -> Shard:
    """This process's share of an evaluation under ``trainer``'s strategy: lockstep when the strategy shards the
    parameters (FSDP, ``ModelParallelStrategy``, DeepSpeed ZeRO-3), where every forward is a collective."""
    strategy = trainer.strategy
    sharded = isinstance(strategy, FSDPStrategy | ModelParallelStrategy) or (
        isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    )
    return Shard(trainer.global_rank, trainer.world_size, lockstep=sharded and trainer.world_size > 1)


def ranks_weights_digest(shard: Shard, model: nn.Module) -> str:
    """The digest of the weights the ranks evaluate together, the same on every rank (a collective).

    Replicas (DDP) must agree, or the ranks would evaluate different models under one name; shards (lockstep) are
    digested together, in rank order.

    Raises:
        RuntimeError: Replicas hold different weights.
    """
    digests = shard.all_gather(weights_digest(model))
    if shard.lockstep:
        return hashlib.sha256("|".join(digests).encode()).hexdigest()[:16]
    if len(set(digests)) > 1:
        raise RuntimeError(f"the ranks hold different weights (digests by rank: {digests}): replicas have diverged")
    return digests[0]
