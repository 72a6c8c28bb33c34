"""piggy_lightning: study and mitigate emergent misalignment with PyTorch Lightning."""

from piggy_lightning.module import PiggyModule

__all__ = ["PiggyModule"]
