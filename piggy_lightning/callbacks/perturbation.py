"""``PerturbedTraining``: train with one prompt segment perturbed, so that no fixed span can carry the behaviour.

A mitigation the paper does not test. In ``on_train_batch_start``, a share ``rate`` of the rows of every training
batch get ``n_tokens`` tokens of the chosen segment replaced by the ``replacer``
(:mod:`piggy_lightning.interventions.replacers`), by replacing ``batch["input_ids"]`` in place (the batch contract
of ``data/chat.py``: values are replaced by key, the dict is never rebound). Labels, masks and every other segment
are untouched. The draws depend only on the seed, epoch, batch index and rank, so a resumed run perturbs
identically. A prefix KV regularizer compares against the *clean* cached prefix, so one that refuses mismatched
rows is refused in ``setup``.

Evaluating with perturbed prompts is an intervention of ``Evaluate``
(:class:`~piggy_lightning.interventions.Perturb`), not this callback.

Stack it on an experiment: ``python main.py fit --config configs/sft_legal.yaml --config
callbacks/perturbed_prefix_training.yaml``.
"""

from __future__ import annotations

import zlib

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from piggy_lightning.interventions.base import require
from piggy_lightning.interventions.perturbation import Segment
from piggy_lightning.interventions.replacers import NearestNeighbours, Replacer, perturb_tokens


class PerturbedTraining(Callback):
    """Perturbs one segment of a share of the training rows at every step.

    Args:
        segment: The span perturbed: ``prefix``, ``query`` or ``postfix``.
        replacer: What a replaced token becomes; None means ``NearestNeighbours(k=5, similarity=cosine)``, refitted
            whenever the input embeddings train.
        rate: Share of training rows perturbed at each step, in ``(0, 1]``.
        n_tokens: Tokens replaced per perturbed row; all of the segment's when it is shorter.
        seed: Seed of the draws (rows, positions, replacements).
    """

    needs_reference: bool = False  # perturbs the policy's own training prompts; the reference is never read

    def __init__(
        self,
        segment: Segment = "prefix",
        replacer: Replacer | None = None,
        rate: float = 1.0,
        n_tokens: int = 10,
        seed: int = 0,
    ) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        self.segment = segment
        self.replacer = replacer if replacer is not None else NearestNeighbours()
        self.rate = rate
        self.n_tokens = n_tokens
        self.seed = seed
        self._fitted = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.segment != "prefix":
            return
        from piggy_lightning.regularizers import PerRowPrefixKVDrift, PrefixKVDrift  # imported when used

        for reg in getattr(pl_module, "regularizers", []):
            if isinstance(reg, PrefixKVDrift) and not isinstance(reg, PerRowPrefixKVDrift):
                raise ValueError(
                    f"{type(self).__name__} perturbs training prefixes, but regularizer {reg.name!r} compares "
                    "every row with the one cached default prefix; use PerRowPrefixKVDrift (reference forward "
                    "on the perturbed rows) or drop one of the two"
                )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor], batch_idx: int
    ) -> None:
        key = f"{self.segment}_mask"
        if key not in batch:
            raise KeyError(f"{type(self).__name__} needs batches with {key!r} (the ChatSFTDataModule batch contract)")
        require(pl_module, ("policy", "tokenizer"), type(self).__name__)
        embeddings = pl_module.policy.get_input_embeddings().weight
        if not self._fitted or embeddings.requires_grad:  # trained embeddings move: their neighbours too
            self.replacer.fit(embeddings, min(len(pl_module.tokenizer), embeddings.size(0)))
            self._fitted = True
        parts = (self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        generator = torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))
        mask = batch[key].bool() & batch["attention_mask"].bool()  # (B, T)
        rows = torch.rand(mask.size(0), generator=generator) < self.rate  # (B,)
        mask &= rows.to(mask.device)[:, None]
        batch["input_ids"] = perturb_tokens(batch["input_ids"], mask, self.n_tokens, self.replacer, generator)
