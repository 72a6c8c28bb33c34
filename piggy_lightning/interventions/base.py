"""What an ``Evaluate`` callback evaluates under: interventions as components, configured by class path.

An :class:`Intervention` is data plus three steps that ``Evaluate`` calls at each moment listed in its ``at``,
after the unchanged baseline evaluation of the same weights. The moments are ``epoch`` (every epoch end at which
``Evaluate`` evaluates, i.e. its ``every_n_epochs``: the paper's Fig. 6 evaluates with and without the prefix patch
after each of epochs 1-6), ``fit_end`` and ``test``:

1. :meth:`~Intervention.runs` binds it to the module being evaluated (its frozen reference, spans, embeddings,
   tokenizer; a bad layer index fails here, before training) and returns the generation interventions to evaluate
   under, one evaluation each: one for a patch, one per layer for a sweep;
2. :meth:`~Intervention.decoding` says how those evaluations generate (perturbation trials sample);
3. :meth:`~Intervention.conclude` reads their reports beside the baseline's, writes its own files and returns what
   to log beyond every evaluation's own metrics (:class:`Findings`: Best/Avg, a per-layer curve, a chart).

``needs_reference`` tells ``PiggyModule`` (through ``Evaluate.needs_reference``) to keep a frozen copy of the
initial weights under full finetuning: patches read the reference after training, when the policy no longer holds
the initial weights.

In a LightningCLI config they are listed under the top-level ``interventions:`` key, which ``PiggyCLI`` links to
every ``Evaluate`` callback, so the presets in ``callbacks/`` append to it with ``interventions+:``::

    interventions:
      - class_path: piggy_lightning.interventions.PrefixKVSplice
      - class_path: piggy_lightning.interventions.QueryControl
      - class_path: piggy_lightning.interventions.Perturb
        init_args:
          segment: prefix
          replacer: {class_path: piggy_lightning.interventions.NearestNeighbours, init_args: {k: 5}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from torch import Tensor

from piggy_lightning.evaluation.generation import Decoding
from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.evaluation.runner import EvaluationReport

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule

PatchMoment = Literal["epoch", "fit_end", "test"]
MOMENTS: tuple[str, ...] = get_args(PatchMoment)
Run = tuple[GenerationIntervention, EvaluationReport]  # one evaluation under one generation intervention


@dataclass(frozen=True)
class Occasion:
    """Where and when ``Evaluate`` made the evaluations an intervention concludes from.

    Attributes:
        root: The ``Evaluate`` directory (each evaluation is in ``<root>/<tag>@<run name>/``).
        tag: The evaluation point, e.g. ``test``, ``fit_end`` or ``epoch=2`` (Lightning's 0-based epoch index).
        name: The ``Evaluate`` callback's name, the prefix of its metric keys.
    """

    root: Path
    tag: str
    name: str


@dataclass
class Findings:
    """What an intervention reports beyond its evaluations' own metrics; ``Evaluate`` logs it.

    Attributes:
        scalars: Metric key -> value, logged at the evaluation's step.
        curves: Metric key -> ``{step: value}``, logged at their own steps (a per-layer curve: the step is the layer).
        images: Image tag -> ``(3, H, W)`` uint8 raster.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    images: dict[str, Tensor] = field(default_factory=dict)


def require(module: Any, attrs: Sequence[str], who: str) -> None:
    """Fail fast unless ``module`` has every attribute in ``attrs`` (as a ``PiggyModule`` with its model built)."""
    for attr in attrs:
        if getattr(module, attr, None) is None:
            raise TypeError(
                f"{who} needs a module with .{attr} (a PiggyModule after configure_model); got {type(module).__name__}"
            )


class Intervention:
    """Base of the components of ``Evaluate(interventions=[...])``; subclasses implement :meth:`runs`.

    Args:
        at: Moments to evaluate under it: ``epoch`` (each epoch end ``Evaluate`` evaluates at, by its
            ``every_n_epochs``), ``fit_end`` and/or ``test``; None means ``[test]``.
    """

    needs_reference: bool = False

    def __init__(self, at: list[PatchMoment] | None = None) -> None:
        self.at = set(at if at is not None else ["test"])
        unknown = self.at - set(MOMENTS)
        if unknown or not self.at:  # an intervention at no moment would never be evaluated
            raise ValueError(
                f"{type(self).__name__}: at must list some of {', '.join(MOMENTS)}, got {sorted(at or [])}"
            )

    def runs(self, module: PiggyModule) -> list[GenerationIntervention]:
        """The generation interventions to evaluate under, bound to ``module``; one evaluation each."""
        raise NotImplementedError

    def decoding(self, decoding: Decoding) -> Decoding:
        """How its evaluations generate, given the ``Evaluate`` callback's decoding (unchanged by default)."""
        return decoding

    def conclude(self, runs: list[Run], baseline: EvaluationReport | None, occasion: Occasion) -> Findings:
        """Read the evaluations of :meth:`runs` (in order) beside the unchanged ``baseline``; nothing by default.

        Called on global rank 0 only, after every run of this intervention at this moment was evaluated.
        """
        return Findings()
