"""``ResidualSweep``: alignment per layer when one layer's prefix residual stream comes from the reference.

Paper §4.2 (Fig. 4): for each layer l in turn, the residual stream at the prefix positions is overwritten with
the initial model's and the rest of the finetuned model runs on; a narrow band of middle layers restores alignment.
The paper does not say whether "layer l" is the block's input or output; here ``component`` chooses, and the
default ``block_input`` makes layer l the stream *entering* block l (HF's ``hidden_states[l]``, so layer 0 is the
embeddings). ``block_output`` at l is ``block_input`` at l + 1.

The sweep is a list of interventions: it expands into one :class:`~piggy_lightning.interventions.ActivationPatch`
per layer, and ``Evaluate`` evaluates each like any other (files under ``<eval dir>/<tag>@patch_<site>/``). The
curve is logged as TensorBoard scalars ``<name>/<group>/<metric>`` with the layer as the step (plus the unpatched
``..._baseline``), as an image, and as ``<eval dir>/<tag>@<name>.png`` and ``.json``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.evaluation.runner import EvaluationReport
from piggy_lightning.interventions.base import Findings, Intervention, Occasion, PatchMoment, Run, require
from piggy_lightning.interventions.patch_site import PatchSite
from piggy_lightning.interventions.patching import ActivationPatch
from piggy_lightning.sites import decoder_layers, resolve_layers

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule


def _value(report: EvaluationReport | None, group: str, metric: str) -> float | None:
    if report is None:
        return None
    return report.summary["groups"].get(group, {}).get(metric)


class ResidualSweep(Intervention):
    """Patches one layer's residual stream at a time, one evaluation per layer, and charts the metric per layer.

    Args:
        layers: Layers to sweep (0-based, negative from the end); None sweeps every layer.
        component: ``block_input``: layer l is the stream entering block l; ``block_output``: leaving it.
        positions: Positions patched at each layer: the ``prefix`` (the paper) or the ``postfix``.
        group: Question group of the curve.
        metric: Metric of the curve (a key of the summary's group metrics, e.g. ``alignment``).
        at: Moments to sweep: ``epoch`` (each epoch end Evaluate evaluates), ``fit_end``, ``test``; None: ``[test]``.
        name: Prefix of the curve's metric keys and files; distinct sweeps need distinct names.
    """

    needs_reference = True

    def __init__(
        self,
        layers: list[int] | None = None,
        component: Literal["block_input", "block_output"] = "block_input",
        positions: Literal["prefix", "postfix"] = "prefix",
        group: str = "general",
        metric: str = "alignment",
        at: list[PatchMoment] | None = None,
        name: str = "residual_sweep",
    ) -> None:
        super().__init__(at)
        self.layers = layers
        self.component = component
        self.positions = positions
        self.group = group
        self.metric = metric
        self.name = name
        self.curve: dict[int, float | None] = {}  # layer -> metric of the last sweep

    def runs(self, module: PiggyModule) -> list[GenerationIntervention]:
        """One residual patch per layer, in layer order."""
        require(module, ("policy",), type(self).__name__)
        layers = resolve_layers(self.layers, len(decoder_layers(module.policy)))
        return [ActivationPatch(PatchSite(self.component, self.positions, [i])).bind(module) for i in layers]

    def conclude(self, runs: list[Run], baseline: EvaluationReport | None, occasion: Occasion) -> Findings:
        from piggy_lightning.interventions.plot import line_chart  # matplotlib loads only when a sweep is charted

        curve = {patch.site.layers[0]: _value(report, self.group, self.metric) for patch, report in runs}
        base = _value(baseline, self.group, self.metric)
        self.curve = curve
        key = f"{self.name}/{self.group}/{self.metric}"
        layers = sorted(curve)
        stem = occasion.root / f"{occasion.tag}@{self.name}"
        image = line_chart(layers, [curve[i] for i in layers], base, stem.with_suffix(".png"),
                           xlabel=f"layer ({self.component})", ylabel=f"{self.group} {self.metric}")  # fmt: skip
        meta = {"component": self.component, "positions": self.positions, "group": self.group, "metric": self.metric}
        data = {**meta, "baseline": base, "curve": {str(i): v for i, v in curve.items()}}
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        curves = {key: {i: v for i, v in curve.items() if v is not None}}
        if base is not None:
            curves[f"{key}_baseline"] = dict.fromkeys(curve, base)
        return Findings(curves=curves, images={f"{key}/{occasion.tag}": image})
