"""Watch how far the prefix keys and values drift from the initial model's, with or without TReFT.

Because the prefix is the same in every prompt and attention is causal, the drift of its keys and values is a
property of the weights alone: one policy forward over the P prefix tokens measures it exactly. This makes the
monitor cheap enough for plain SFT runs (lambda = 0), where it shows the piggyback carrier forming
(paper §3 and §5.1). Add it with ``trainer.callbacks+: [{class_path:
piggy_lightning.callbacks.drift_monitor.KVDriftMonitor}]``.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from piggy_lightning.drift import (
    KVSource,
    kv_needs,
    reference_kv,
    relative_drift,
    select_kv,
)
from piggy_lightning.forward import eval_mode, run_forward
from piggy_lightning.sites import kv_projections, resolve_layers


def _first_row(t: Tensor) -> Tensor:
    return t[0]  # the single prefix row: (P, X)


class KVDriftMonitor(L.Callback):
    """Log per-layer relative drift of the prefix keys and values every N optimizer steps.

    Scalars ``drift/prefix_k/layer_<i>``, ``drift/prefix_v/layer_<i>`` and their TReFT total ``drift/prefix_kv``
    go to every logger; TensorBoard also gets a histogram of the per-(layer, position) drifts and an image with
    one row per layer (keys on top, values below) and one column per prefix token, scaled to its maximum
    (``drift/prefix_kv_max``). The drift is TReFT's relative squared distance (``drift_math.relative_drift``).

    Args:
        every_n_steps: Log every this many optimizer steps (and once before training starts).
        source: ``kv``: the real key/value projection outputs; ``kv_normed``: keys after Qwen3's ``k_norm``;
            ``hidden``: projections of the pre-norm residual stream (the released training code's variant).
        layers: Decoder layers to monitor (negative counts from the end); None means all.
    """

    needs_reference: bool = True  # the initial prefix K/V, read at fit start (after a resume restored the policy)

    def __init__(self, every_n_steps: int = 50, source: KVSource = "kv", layers: list[int] | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.source, self.layers = every_n_steps, source, layers
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, scalars), for inspection and tests
        self._prefix: dict[str, Tensor] | None = None
        self._reference: tuple[Tensor, Tensor] | None = None  # (L, P, D) keys and values of the initial model
        self._layer_ids: list[int] = []
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "reference", None) is None or getattr(pl_module, "spans", None) is None:
            raise TypeError("KVDriftMonitor needs a PiggyModule (a policy with a reference and chat spans)")
        ids = torch.tensor(pl_module.spans.anatomy.prefix_ids, dtype=torch.long, device=pl_module.device)  # (P,)
        if ids.numel() == 0:
            raise ValueError("KVDriftMonitor: the chat template has an empty prefix; there is nothing to monitor")
        self._prefix = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids[None])}  # (1, P)
        self._layer_ids = resolve_layers(self.layers, len(kv_projections(pl_module.policy)))
        keys, values = reference_kv(pl_module.reference, self._prefix, self._layer_ids, self.source, _first_row)
        self._reference = keys.float(), values.float()
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    @torch.no_grad()
    def drift(self, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """Per-(layer, position) relative drift ``(L, P)`` of the current policy's prefix keys and of its values."""
        policy = pl_module.policy
        with eval_mode(policy):
            record = run_forward(policy, self._prefix, kv_needs(self.source))
            projections = kv_projections(policy)
            keys, values = select_kv(record, self._layer_ids, self.source, _first_row, projections)  # (L, P, D)
        return relative_drift(keys, self._reference[0]), relative_drift(values, self._reference[1])

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation repeats a step
            return
        self._last_step = step
        # every rank runs the one-row forward: under FSDP it is a collective (rank 0 alone would wait forever for
        # the others' shards); under DDP the replicas compute the same numbers, and only rank 0 writes them
        drift_k, drift_v = self.drift(pl_module)  # (L, P) each
        if not trainer.is_global_zero:
            return
        per_k, per_v = drift_k.mean(1).tolist(), drift_v.mean(1).tolist()
        scalars = {"drift/prefix_kv": (drift_k.mean(1) + drift_v.mean(1)).mean().item()}
        for i, layer in enumerate(self._layer_ids):
            scalars[f"drift/prefix_k/layer_{layer:02d}"] = per_k[i]
            scalars[f"drift/prefix_v/layer_{layer:02d}"] = per_v[i]
        self.history.append((step, scalars))
        self._write(trainer, step, scalars, torch.cat([drift_k, drift_v]))

    @rank_zero_only
    def _write(self, trainer: L.Trainer, step: int, scalars: dict[str, float], grid: Tensor) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_histogram("drift/prefix_kv_positions", grid.flatten(), step)
                top = grid.max().clamp_min(1e-12)
                writer.add_scalar("drift/prefix_kv_max", top.item(), step)
                writer.add_image("drift/prefix_kv_layers", (grid / top)[None].cpu(), step)  # (1, 2L, P)
