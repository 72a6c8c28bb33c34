"""Chat-SFT data: reading and validating rows, the DataModule base and one thin DataModule per narrow task."""

from piggy_lightning.data.chat import ChatSFTDataModule, collate
from piggy_lightning.data.io import DataError, ReadReport, read_chats
from piggy_lightning.data.tasks import (
    AbstentionDataModule,
    AutoDataModule,
    FinanceDataModule,
    LegalDataModule,
    MedicalDataModule,
    RefusalDataModule,
    ToolUseDataModule,
)

__all__ = [
    "AbstentionDataModule",
    "AutoDataModule",
    "ChatSFTDataModule",
    "DataError",
    "FinanceDataModule",
    "LegalDataModule",
    "MedicalDataModule",
    "ReadReport",
    "RefusalDataModule",
    "ToolUseDataModule",
    "collate",
    "read_chats",
]
