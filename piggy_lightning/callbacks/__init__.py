"""Lightning callbacks chosen by class path in ``trainer.callbacks`` (presets live in the top-level ``callbacks/``).

| callback | what it does | source |
|---|---|---|
| ``Evaluate`` | generate, judge, log EM metrics (fit end, every N epochs, test), also under interventions | §4 |
| ``PerturbedTraining`` | train with one prompt segment perturbed (nearest-neighbour or random tokens) | new |
| ``DataInterleaving`` | mix an aligned retain set into each epoch at a fixed share | paper §5.2, Table 14 |
| ``KVDriftMonitor`` | log per-layer prefix K/V drift from the initial model | paper §5.1 |
| ``ExportPretrained`` | save the adapter (or model) + tokenizer in transformers/peft format | |

``Evaluate``'s interventions are components, not callbacks (:mod:`piggy_lightning.interventions`): prefix K/V splice
and the query control (paper §4.2, Fig. 3), activation patches at any site (postfix, Fig. 5), the per-layer
residual sweep (Fig. 4) and token perturbation (§4.1, Table 1).
"""

from piggy_lightning.callbacks.drift_monitor import KVDriftMonitor
from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.callbacks.export import ExportPretrained
from piggy_lightning.callbacks.interleaving import DataInterleaving
from piggy_lightning.callbacks.perturbation import PerturbedTraining

__all__ = [
    "DataInterleaving",
    "Evaluate",
    "ExportPretrained",
    "KVDriftMonitor",
    "PerturbedTraining",
]
