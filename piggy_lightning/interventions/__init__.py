"""Interventions: the components ``Evaluate`` evaluates under, with their mechanics (KV splicing, activation
patching, the residual sweep, token perturbation and its replacers, the sweep's chart).

| component | what it changes | source |
|---|---|---|
| ``PrefixKVSplice`` | the prefix keys and values come from the reference (spliced into the cache) | §3.1, Fig. 3 |
| ``QueryControl`` | the reference's keys and values at as many leading query positions (the control) | §3.1 |
| ``ActivationPatch`` | any ``PatchSite`` (the postfix from an empty-query reference, a residual stream) | Fig. 5 |
| ``ResidualSweep`` | one residual-stream patch per layer, charted per layer | §3.2, Fig. 4 |
| ``CarrierScan`` | one key/value patch per prefix position and per span, tabled and charted | new |
| ``Perturb``, ``PerturbAsText`` | ``n`` tokens of a segment replaced by a ``Replacer`` component | §2, Table 1 |

The callbacks that decide when to use them live in ``piggy_lightning.callbacks`` (``Evaluate``, and
``PerturbedTraining`` for perturbed training batches); their YAML presets in the top-level ``callbacks/`` folder.
"""

from piggy_lightning.interventions.base import Findings, Intervention, Occasion
from piggy_lightning.interventions.carrier import CarrierScan
from piggy_lightning.interventions.patch_site import PatchSite
from piggy_lightning.interventions.patching import ActivationPatch, PrefixKVSplice, QueryControl
from piggy_lightning.interventions.perturbation import Perturb, PerturbAsText, best_and_average
from piggy_lightning.interventions.replacers import NearestNeighbours, Replacer, UniformTokens, perturb_tokens
from piggy_lightning.interventions.sweep import ResidualSweep

__all__ = [
    "ActivationPatch",
    "CarrierScan",
    "Findings",
    "Intervention",
    "NearestNeighbours",
    "Occasion",
    "PatchSite",
    "Perturb",
    "PerturbAsText",
    "PrefixKVSplice",
    "QueryControl",
    "Replacer",
    "ResidualSweep",
    "UniformTokens",
    "best_and_average",
    "perturb_tokens",
]
