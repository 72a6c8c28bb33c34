"""Export the trained policy in transformers/peft format at the end of fit.

With LoRA this writes peft's adapter files (``adapter_config.json`` + ``adapter_model.safetensors``), which plain
peft, transformers, a vLLM server with LoRA enabled, or ``main.py test --model.adapter <dir>`` can load on top of the
base model; ``piggy_base.json`` beside them records which base that is (its name and
:func:`~piggy_lightning.modeling.base_fingerprint`), so that loading the adapter over another base fails loudly.
With full finetuning it writes the whole model. The tokenizer (with its chat template) is saved beside it.

Under a sharded policy (``ModelParallelStrategy``, ``piggy_lightning/fsdp.py``) the tensors are gathered first,
on every rank (a collective), and rank 0 writes them: the files are the same as an unsharded run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from piggy_lightning.fsdp import gather_state_dict, is_sharded
from piggy_lightning.modeling import BASE_FILE, base_fingerprint


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
        self.export(pl_module, self._out, trainer.is_global_zero)
        trainer.strategy.barrier("piggy_export")  # the files exist on every rank's return

    @staticmethod
    def export(pl_module: L.LightningModule, out: Path, write: bool) -> None:
        """Write ``pl_module``'s policy and tokenizer to ``out``; every rank calls it, the one with ``write`` writes.

        Args:
            pl_module: A module with ``policy``, ``tokenizer`` and ``model_name_or_path``.
            out: The output directory.
            write: Whether this rank writes (global rank 0).
        """
        policy = pl_module.policy
        adapter = hasattr(policy, "peft_config")
        state = None
        if is_sharded(policy):  # a collective: gather the adapter only (or the whole policy under full finetuning)
            names = {n for n, p in policy.named_parameters() if p.requires_grad} if adapter else None
            state = gather_state_dict(policy, names)
        fingerprint = base_fingerprint(policy) if adapter else None  # a collective too, under sharding
        if not write:
            return
        policy.save_pretrained(out, state_dict=state) if state is not None else policy.save_pretrained(out)
        pl_module.tokenizer.save_pretrained(out)
        if adapter:
            base = {"model_name_or_path": pl_module.model_name_or_path, "fingerprint": fingerprint}
            (Path(out) / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
        rank_zero_info(f"exported the trained policy to {out}")
