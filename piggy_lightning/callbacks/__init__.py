"""Lightning callbacks chosen by class path in ``trainer.callbacks`` (presets live in the top-level ``callbacks/``).

| callback | what it does | source |
|---|---|---|
| ``Evaluate`` | generate, judge and log EM metrics (fit end, every N epochs, test) | paper §4, App. D |
| ``ActivationPatching`` | evaluate with reference K/V patched in at prefix/query/postfix | paper §4.2, Fig. 3, 5 |
| ``ResidualPatchingSweep`` | patch the prefix residual stream one layer at a time | paper §4.2, Fig. 4 |
| ``TokenPerturbation`` | nearest-neighbour token swaps in one segment (eval or training) | paper §4.1, Table 1 |
| ``DataInterleaving`` | mix an aligned retain set into each epoch at a fixed share | paper §5.2, Table 14 |
| ``KVDriftMonitor`` | log per-layer prefix K/V drift from the initial model | paper §5.1 |
| ``ExportPretrained`` | save the adapter (or model) + tokenizer in transformers/peft format | |
"""

from piggy_lightning.callbacks.drift_monitor import KVDriftMonitor
from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.callbacks.export import ExportPretrained
from piggy_lightning.callbacks.interleaving import DataInterleaving
from piggy_lightning.callbacks.patching import ActivationPatching
from piggy_lightning.callbacks.perturbation import TokenPerturbation
from piggy_lightning.callbacks.residual_sweep import ResidualPatchingSweep

__all__ = [
    "ActivationPatching",
    "DataInterleaving",
    "Evaluate",
    "ExportPretrained",
    "KVDriftMonitor",
    "ResidualPatchingSweep",
    "TokenPerturbation",
]
