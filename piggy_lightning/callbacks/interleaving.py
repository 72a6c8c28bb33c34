"""``DataInterleaving``: mix an aligned retain set into the training data (the main baseline, paper §5.2).

**Ratio.** ``ratio`` is the share of retain examples in each epoch's mixture. With N training examples an epoch
holds all N plus R = round(N * ratio / (1 - ratio)) retain examples, so R / (N + R) equals ``ratio`` exactly when
N * ratio / (1 - ratio) is a whole number and is otherwise off by less than half an example (paper: 20%; N = 4,000
gives R = 1,000). The R retain rows are drawn once, without replacement, from a permutation of the retain set seeded
by ``seed`` (cycling through fresh permutations when R exceeds the retain set), and the datamodule's per-epoch
shuffle (``data/sampling.py``: seed + epoch) then orders the whole mixture: the sequence depends only on the seeds and
the epoch (and, split over ranks, the world size).

**Mechanism.** The datamodule reads and encodes the retain file exactly like its training data (same template,
truncation, ``drop_system``, and the same on-disk token cache); the callback, in ``setup("fit")`` after the
datamodule's own setup, appends the drawn rows to its ``train_set``. Validation data is untouched.

**Resume.** The mixture is rebuilt from the configuration, and the checkpoint's record of it (sizes, seed and a
digest of the drawn rows) must match, else the run fails instead of silently continuing on other data; with the
datamodule's resumable epoch-seeded shuffle (a ``StatefulDataLoader`` over the mixture) a resumed run, from an
epoch-end or a mid-epoch checkpoint, sees the same examples in the same order as an uninterrupted one.

Stack it on an experiment: ``python main.py fit --config configs/treft_legal.yaml --config
callbacks/data_interleaving.yaml``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from piggy_lightning.spans import TokenizedChat

log = logging.getLogger(__name__)


def retain_draw(n_train: int, n_retain_set: int, ratio: float, seed: int) -> list[int]:
    """Indices into the retain set of the R = round(n_train * ratio / (1 - ratio)) rows mixed into every epoch."""
    n_mix = round(n_train * ratio / (1.0 - ratio))
    generator = torch.Generator().manual_seed(seed)
    draw: list[int] = []
    while len(draw) < n_mix:
        draw += torch.randperm(n_retain_set, generator=generator).tolist()
    return draw[:n_mix]


class DataInterleaving(Callback):
    """Adds retain examples to the training set so they make up ``ratio`` of every epoch.

    Args:
        retain_data: A chat source the datamodule can read (``.jsonl``/``.json``/``.parquet``, a ``datasets`` name or
            ``piggy/organism/retain.jsonl``), e.g. OpenAI's ``<domain>_correct`` sets or the paper's multi-domain set.
        ratio: Share of retain examples in each epoch's mixture, in [0, 1) (paper: 0.2; see the module docstring).
        seed: Seed of the retain draw; None uses the datamodule's ``seed``.
    """

    def __init__(self, retain_data: str, ratio: float = 0.2, seed: int | None = None) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        self.retain_data = retain_data
        self.ratio = ratio
        self.seed = seed
        self.record: dict[str, Any] | None = None  # what was mixed in; saved in checkpoints
        self._mixed: list[TokenizedChat] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(retain_data=self.retain_data)  # not the ratio: a changed ratio must be caught

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        if data is None or not hasattr(data, "encode") or getattr(data, "train_set", None) is None:
            raise TypeError(
                "DataInterleaving needs a ChatSFTDataModule (or subclass) set up with a train_set; "
                f"got {type(data).__name__}"
            )
        if self._mixed is not None and data.train_set is self._mixed:
            return  # a later setup (e.g. fit after validate) must not mix twice
        train = list(data.train_set)
        retain = data.encode(self.retain_data)
        seed = self.seed if self.seed is not None else data.hparams.seed
        draw = retain_draw(len(train), len(retain), self.ratio, seed)
        self._mixed = train + [retain[i] for i in draw]
        data.train_set = self._mixed
        self.record = {
            "retain_data": self.retain_data, "ratio": self.ratio, "seed": seed, "n_train": len(train),
            "n_retain_set": len(retain), "n_retain": len(draw), "digest": self._digest(draw, retain),
        }  # fmt: skip
        log.info("DataInterleaving: %d training + %d retain examples per epoch", len(train), len(draw))

    @staticmethod
    def _digest(draw: list[int], retain: list[TokenizedChat]) -> str:
        h = hashlib.sha256()
        for i in draw:
            h.update(repr((i, retain[i].input_ids)).encode())
        return h.hexdigest()[:16]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.record is not None:
            for logger in trainer.loggers:
                logger.log_hyperparams({f"interleaving/{k}": v for k, v in self.record.items()})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.record or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or self.record is None:
            return
        differ = {k: (v, self.record.get(k)) for k, v in state_dict.items() if self.record.get(k) != v}
        if differ:
            raise ValueError(
                "DataInterleaving: the checkpoint was trained on another mixture; resuming would not continue the "
                f"same sequence of examples. Differences (checkpoint, now): {differ}"
            )
