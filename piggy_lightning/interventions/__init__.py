"""Intervention mechanics: patch sites and hooks, KV splicing, activation patching, token perturbation, charts.

The callbacks that decide when to use them live in ``piggy_lightning.callbacks`` (``ActivationPatching``,
``ResidualPatchingSweep``, ``TokenPerturbation``, ``DataInterleaving``); their YAML presets in the top-level
``callbacks/`` folder.
"""

from piggy_lightning.interventions.patching import ActivationPatch, PrefixKVSplice
from piggy_lightning.interventions.perturbation import (
    NearestNeighbours,
    PromptPerturbation,
    UniformTokens,
    perturb_tokens,
)
from piggy_lightning.interventions.plot import line_chart, write_png
from piggy_lightning.interventions.sites import PatchSite, forward_values, overwriting, recording, site_modules

__all__ = [
    "ActivationPatch",
    "NearestNeighbours",
    "PatchSite",
    "PrefixKVSplice",
    "PromptPerturbation",
    "UniformTokens",
    "forward_values",
    "line_chart",
    "overwriting",
    "perturb_tokens",
    "recording",
    "site_modules",
    "write_png",
]
