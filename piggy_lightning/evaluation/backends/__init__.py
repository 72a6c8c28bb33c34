"""Generation backends for evaluation (see :mod:`piggy_lightning.evaluation.backends.base`)."""

from piggy_lightning.evaluation.backends.base import (
    BackendMismatch,
    Completion,
    GenerationBackend,
    GenerationContext,
)
from piggy_lightning.evaluation.backends.hf import HFBackend

__all__ = ["BackendMismatch", "Completion", "GenerationBackend", "GenerationContext", "HFBackend"]
