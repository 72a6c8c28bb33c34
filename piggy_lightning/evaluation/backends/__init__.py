"""Generation backends for evaluation (see :mod:`piggy_lightning.evaluation.backends.base`)."""

from piggy_lightning.evaluation.backends.base import (
    BackendMismatch,
    Completion,
    GenerationBackend,
    GenerationContext,
)
from piggy_lightning.evaluation.backends.hf import HFBackend
from piggy_lightning.evaluation.backends.server import CompletionsServer, RuntimeLoRA
from piggy_lightning.evaluation.backends.vllm import VLLMBackend  # imports vllm only when a session starts

__all__ = [
    "BackendMismatch",
    "Completion",
    "CompletionsServer",
    "GenerationBackend",
    "GenerationContext",
    "HFBackend",
    "RuntimeLoRA",
    "VLLMBackend",
]
