"""Lightning callbacks chosen by class path in ``trainer.callbacks`` (presets live in the top-level ``callbacks/``).

| callback | what it does | source |
|---|---|---|
| ``Evaluate`` | generate, judge and log EM metrics (fit end, every N epochs, test) | SCIENCE.md §6-8 |
| ``ActivationPatching`` | evaluate with reference K/V patched in at prefix/query/postfix | SCIENCE.md §3.1 |
| ``ResidualPatchingSweep`` | patch the prefix residual stream one layer at a time | SCIENCE.md §3.2 |
| ``TokenPerturbation`` | nearest-neighbour token swaps in one segment (eval or training) | SCIENCE.md §2 |
| ``DataInterleaving`` | mix an aligned retain set into each epoch at a fixed share | SCIENCE.md §5.1 |
| ``KVDriftMonitor`` | log per-layer prefix K/V drift from the initial model | SCIENCE.md §4 |
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
