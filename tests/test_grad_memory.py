"""Gradients are freed right after each optimizer step, not after the next forward (Lightning's order), so they
never sit beside a forward's activations; gradient accumulation still accumulates."""

import lightning as L
import pytest
import torch

from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.module import PiggyModule


class _Grads(L.Callback):
    def __init__(self) -> None:
        self.alive: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.alive.append(any(p.grad is not None for p in pl_module.parameters() if p.requires_grad))


@pytest.mark.parametrize(("accumulate", "expected"), [(1, [False] * 4), (2, [True, False, True, False])])
def test_gradients_are_freed_after_each_optimizer_step(tiny_qwen, chat_file, accumulate, expected):
    grads = _Grads()
    module = PiggyModule(tiny_qwen, lora=None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4 // accumulate, accumulate_grad_batches=accumulate, logger=False,
        callbacks=[grads], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    assert grads.alive == expected
