"""This process's share of a sharded evaluation, and the two object collectives it needs.

An evaluation's work is split into units (a backend's batches) in an order every rank computes identically; rank
``r`` of ``w`` takes units ``r, r + w, ...`` of those not yet done. Greedy and sampled outputs are then exactly
those of one process: the units are the same batches, seeded the same way (``tests/test_ddp.py``).

``lockstep`` is for sharded parameters (FSDP, ``ModelParallelStrategy``, DeepSpeed ZeRO-3): every forward is a
collective there, so every rank must run the same number of forwards. A lockstep shard pads its units to the
longest share with repeats whose output is dropped, computes every shared-prefix cache on every rank, and asks
``generate`` for ``synced_gpus`` (each rank keeps stepping until all have finished).

The collectives are ``torch.distributed``'s object gathers: Lightning's strategies initialise the process group but
offer tensor gathers only (``Strategy.all_gather``), and results are records, not tensors. Nothing here opens a
process group of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Which part of an evaluation this process generates and judges.

    Attributes:
        rank: This process's global rank.
        world: Number of processes sharing the evaluation.
        lockstep: Parameters are sharded across the processes (FSDP-like), so every rank runs the same forwards.
    """

    rank: int = 0
    world: int = 1
    lockstep: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world}")
        if self.world > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"a shard of a world of {self.world} needs an initialised torch.distributed group")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, units: list[T]) -> list[T]:
        """This rank's units; under lockstep padded with repeats (``None`` marks a repeat) to the longest share."""
        mine: list[Any] = units[self.rank :: self.world]
        if self.lockstep and units:
            longest = -(-len(units) // self.world)
            mine += [None] * (longest - len(mine))
        return mine

    def all_gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: T) -> list[T] | None:
        """``obj`` of every rank, in rank order, on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out
