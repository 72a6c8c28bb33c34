"""The warmup-cosine schedule: learning rates per optimizer step against hand-computed values, and a fit's step count
taken from the trainer."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.optim import CosineWithWarmup


def _lrs(schedule: CosineWithWarmup, total: int, lr: float = 0.1) -> list[float]:
    """The learning rate of each optimizer step 0..total (the last is the rate after the final step)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = schedule(optimizer, total)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize(
    ("min_lr_ratio", "expected"),
    [
        # 2 warmup steps of 6, base 0.1: 0, 0.05, then 0.1 * (1 + cos(pi * p)) / 2 at p = (s - 2) / 4:
        # p = 1/4 -> (1 + 0.70710678) / 2 = 0.85355339; p = 1/2 -> 0.5; p = 3/4 -> 0.14644661; p = 1 -> 0
        (0.0, [0.0, 0.05, 0.1, 0.085355339, 0.05, 0.014644661, 0.0]),
        # floor 0.2: 0.1 * (0.2 + 0.8 * f): f = 0.85355339 -> 0.88284271, 0.5 -> 0.6, 0.14644661 -> 0.31715729, 0 -> 0.2
        (0.2, [0.0, 0.05, 0.1, 0.088284271, 0.06, 0.031715729, 0.02]),
    ],
    ids=["to_zero", "to_floor"],
)
def test_learning_rate_per_step_is_linear_warmup_then_cosine(min_lr_ratio, expected):
    rates = _lrs(CosineWithWarmup(warmup_steps=2, min_lr_ratio=min_lr_ratio), total=6)
    torch.testing.assert_close(rates, expected, rtol=0, atol=1e-9)


def test_no_warmup_starts_at_the_base_rate_and_bad_settings_are_refused():
    rates = _lrs(CosineWithWarmup(warmup_steps=0), total=4)  # p = s / 4: 1, 0.85355339, 0.5, 0.14644661, 0
    torch.testing.assert_close(rates, [0.1, 0.085355339, 0.05, 0.014644661, 0.0], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        CosineWithWarmup(min_lr_ratio=1.5)


class _StepRates(Callback):
    def __init__(self):
        self.rates: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates[trainer.global_step] = optimizer.param_groups[0]["lr"]


def test_a_fit_schedules_over_the_trainers_optimizer_steps(tiny_qwen, chat_file, tmp_path):
    """18 training rows / 4 = 5 batches per epoch; accumulating 2 gives ceil(5 / 2) = 3 optimizer steps per epoch, so
    3 epochs are T = 9 steps (``trainer.estimated_stepping_batches``). With 2 warmup steps, base 0.01:
    step s < 2: 0.01 * s / 2; else 0.01 * (1 + cos(pi * (s - 2) / 7)) / 2."""
    expected = [0.0, 0.005] + [0.01 * (1 + math.cos(math.pi * (s - 2) / 7)) / 2 for s in range(2, 9)]
    rates = _StepRates()
    module = PiggyModule(
        tiny_qwen, lora=LoraSpec(r=2, alpha=4), optimizer=lambda p: torch.optim.AdamW(p, lr=0.01),
        scheduler=CosineWithWarmup(warmup_steps=2),
    )  # fmt: skip
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[rates],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert sorted(rates.rates) == list(range(9))
    torch.testing.assert_close([rates.rates[s] for s in range(9)], expected, rtol=0, atol=1e-12)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [0.0]  # after step 9 of 9
