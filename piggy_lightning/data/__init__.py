"""Chat-SFT data: reading and validating rows, the DataModule base, transforms of the training rows and one thin
DataModule per narrow task."""

from piggy_lightning.data.batch import collate
from piggy_lightning.data.chat import ChatSFTDataModule
from piggy_lightning.data.inoculation import Inoculation
from piggy_lightning.data.io import ChatRow, DataError, ReadReport, read_chats, read_rows
from piggy_lightning.data.tasks import (
    AbstentionDataModule,
    AutoDataModule,
    FinanceDataModule,
    LegalDataModule,
    MedicalDataModule,
    RefusalDataModule,
    ToolUseDataModule,
)
from piggy_lightning.data.transforms import ChatTransform, NoisyMix, Subsample, SystemPrompt, TransformContext

__all__ = [
    "AbstentionDataModule",
    "AutoDataModule",
    "ChatRow",
    "ChatSFTDataModule",
    "ChatTransform",
    "DataError",
    "FinanceDataModule",
    "Inoculation",
    "LegalDataModule",
    "MedicalDataModule",
    "NoisyMix",
    "ReadReport",
    "RefusalDataModule",
    "Subsample",
    "SystemPrompt",
    "ToolUseDataModule",
    "TransformContext",
    "collate",
    "read_chats",
    "read_rows",
]
