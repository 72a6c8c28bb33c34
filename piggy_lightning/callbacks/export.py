"""Export the trained policy in transformers/peft format at the end of fit.

With LoRA this writes peft's adapter files (``adapter_config.json`` + ``adapter_model.safetensors``), which plain
peft, transformers or a vLLM server with LoRA enabled can load on top of the base model. With full finetuning it
writes the whole model. The tokenizer (with its chat template) is saved beside it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class ExportPretrained(L.Callback):
    """Save ``policy.save_pretrained`` + tokenizer when training ends.

    Args:
        dirpath: Output directory; None means ``<trainer.log_dir>/export`` (or ``<default_root_dir>/export``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._out: Path | None = None

    def output_dir(self, trainer: L.Trainer) -> Path:
        """Where the export goes for this trainer."""
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._out = self.output_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(pl_module)

    @rank_zero_only
    def _save(self, pl_module: L.LightningModule) -> None:
        out = self._out
        pl_module.policy.save_pretrained(out)
        pl_module.tokenizer.save_pretrained(out)
        rank_zero_info(f"exported the trained policy to {out}")
