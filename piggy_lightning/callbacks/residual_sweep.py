"""``ResidualPatchingSweep``: alignment per layer when one layer's prefix residual stream comes from the reference.

Paper §4.2 (Fig. 4): for each layer l in turn, the residual stream at the prefix positions is overwritten with
the initial model's and the rest of the finetuned model runs on; a narrow band of middle layers restores alignment.
The paper does not say whether "layer l" is the block's input or output; here ``component`` chooses, and the
default ``block_input`` makes layer l the stream *entering* block l (HF's ``hidden_states[l]``, so layer 0 is the
embeddings). ``block_output`` at l is ``block_input`` at l + 1.

Each layer is one evaluation through the ``Evaluate`` callback (files under ``<eval dir>/<tag>@patch_<site>/``).
The curve is logged as TensorBoard scalars ``<name>/<group>/<metric>`` with the layer as the step (plus the
unpatched ``..._baseline``), as an image, and as ``<eval dir>/<tag>@<name>.png`` and ``.json``.

Stack it on an experiment: ``python main.py test --config configs/treft_legal.yaml --config
callbacks/residual_sweep.yaml --ckpt_path <checkpoint>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from piggy_lightning.callbacks.patching import EvaluatesAt, PatchMoment, baseline_report
from piggy_lightning.evaluation.runner import EvaluationReport
from piggy_lightning.interventions.patch_site import PatchSite
from piggy_lightning.interventions.patching import ActivationPatch
from piggy_lightning.interventions.plot import line_chart, write_png
from piggy_lightning.sites import decoder_layers, resolve_layers


def _value(report: EvaluationReport | None, group: str, metric: str) -> float | None:
    if report is None:
        return None
    return report.summary["groups"].get(group, {}).get(metric)


class ResidualPatchingSweep(EvaluatesAt):
    """Sweeps the layers, patching one layer's residual stream at a time, and logs the metric per layer.

    Args:
        layers: Layers to sweep (0-based, negative from the end); None sweeps every layer.
        component: ``block_input``: layer l is the stream entering block l; ``block_output``: leaving it.
        positions: Positions patched at each layer: the ``prefix`` (the paper) or the ``postfix``.
        at: Moments to sweep: ``fit_end`` and/or ``test``; None means ``[test]``.
        evaluate: ``name`` of the ``Evaluate`` callback whose question sets, judges, decoding and files are used.
        group: Question group of the curve.
        metric: Metric of the curve (a key of the summary's group metrics, e.g. ``alignment``).
        name: Prefix of the curve's metric keys and files; distinct instances need distinct names.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        component: Literal["block_input", "block_output"] = "block_input",
        positions: Literal["prefix", "postfix"] = "prefix",
        at: list[PatchMoment] | None = None,
        evaluate: str = "eval",
        group: str = "general",
        metric: str = "alignment",
        name: str = "residual_sweep",
    ) -> None:
        self.layers = layers
        self.component = component
        self.positions = positions
        super().__init__(at, evaluate, name)
        self.group = group
        self.metric = metric
        self.curve: dict[int, float | None] = {}  # layer -> metric of the last sweep

    def _layer_ids(self, pl_module: L.LightningModule) -> list[int]:
        return resolve_layers(self.layers, len(decoder_layers(pl_module.policy)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layer_ids(pl_module)  # a bad layer index fails before training, not after

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layer_ids(pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[int, float | None]:
        """Evaluate once unpatched and once per layer now; returns ``{layer: metric}`` (empty off rank 0)."""
        baseline = _value(baseline_report(self._evaluate, trainer, pl_module, tag), self.group, self.metric)
        curve = {}
        for layer in self._layer_ids(pl_module):
            site = PatchSite(self.component, self.positions, [layer])
            report = self._evaluate.evaluate(trainer, pl_module, tag, ActivationPatch(site, pl_module.reference))
            curve[layer] = _value(report, self.group, self.metric)
        if trainer.is_global_zero:
            self.curve = curve
            self._write(trainer, tag, curve, baseline)
        return curve

    @rank_zero_only
    def _write(self, trainer: L.Trainer, tag: str, curve: dict[int, float | None], baseline: float | None) -> None:
        key = f"{self.name}/{self.group}/{self.metric}"
        for logger in trainer.loggers:
            for layer, value in curve.items():
                scalars = {key: value} if value is not None else {}
                if baseline is not None:
                    scalars[f"{key}_baseline"] = baseline
                logger.log_metrics(scalars, step=layer)
        layers = sorted(curve)
        image = line_chart(layers, [curve[i] for i in layers], baseline)  # (3, H, W) uint8
        root = Path(self._evaluate.out_dir(trainer))
        write_png(image, root / f"{tag}@{self.name}.png")
        meta = {"component": self.component, "positions": self.positions, "group": self.group, "metric": self.metric}
        data = {**meta, "baseline": baseline, "curve": {str(i): v for i, v in curve.items()}}
        (root / f"{tag}@{self.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{key}/{tag}", image, trainer.global_step)
