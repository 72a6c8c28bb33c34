"""Intervention mechanics: patch sites and hooks, KV splicing, activation patching, token perturbation, charts.

The callbacks that decide when to use them live in ``piggy_lightning.callbacks`` (``ActivationPatching``,
``ResidualPatchingSweep``, ``TokenPerturbation``, ``DataInterleaving``); their YAML presets in the top-level
``callbacks/`` folder.
"""

from piggy_lightning.interventions.patch_site import PatchSite
from piggy_lightning.interventions.patching import ActivationPatch, PrefixKVSplice
from piggy_lightning.interventions.perturbation import (
    NearestNeighbours,
    PromptPerturbation,
    UniformTokens,
    perturb_tokens,
)
from piggy_lightning.interventions.plot import line_chart, write_png

__all__ = [
    "ActivationPatch",
    "NearestNeighbours",
    "PatchSite",
    "PrefixKVSplice",
    "PromptPerturbation",
    "UniformTokens",
    "line_chart",
    "perturb_tokens",
    "write_png",
]
