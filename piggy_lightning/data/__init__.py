"""Chat-SFT data: reading and validating rows, the DataModule base and one thin DataModule per narrow task."""

from piggy_lightning.data.chat import ChatSFTDataModule, collate
from piggy_lightning.data.io import DataError, ReadReport, read_chats

__all__ = ["ChatSFTDataModule", "DataError", "ReadReport", "collate", "read_chats"]
