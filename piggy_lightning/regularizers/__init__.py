"""Regularizers added to the cross-entropy, chosen by class path in ``model.regularizers``."""

from piggy_lightning.regularizers.base import ForwardRecord, Regularizer

__all__ = ["ForwardRecord", "Regularizer"]
