"""Lightning callbacks chosen by class path in ``trainer.callbacks`` (presets live in the top-level ``callbacks/``)."""

from piggy_lightning.callbacks.drift_monitor import KVDriftMonitor
from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.callbacks.export import ExportPretrained

__all__ = ["Evaluate", "ExportPretrained", "KVDriftMonitor"]
