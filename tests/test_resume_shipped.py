"""The shipped main job, killed mid-epoch and resumed from ``last.ckpt``, equals the uninterrupted run exactly.

``configs/treft_legal.yaml`` trains 3 epochs x 17 steps = 51 with ``CosineWithWarmup``, whose step count
``configure_optimizers`` reads from ``trainer.estimated_stepping_batches``. The run is killed before step 26, i.e.
after 8 of epoch 1's 17 batches; a checkpoint callback saves ``last.ckpt`` at step 25. Reading the step count there
builds the train loader before the checkpoint restores the fit loop's copy of its position (Lightning #20550); without
the data module's own copy, the resumed epoch trained batches 0-7 again instead of 8-16 and every loss from step 26 on
differed.
"""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from piggy_lightning.cli import PiggyCLI

ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER = 25  # of 51 steps: mid-epoch 1 (steps 18-34)


class _Killed(RuntimeError):
    pass


class LossRecorder(Callback):
    """Per-step training loss by global step; optionally dies before the step after ``kill_after``."""

    def __init__(self, kill_after: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.kill_after = kill_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the checkpoint of step ``kill_after`` was written at the previous batch end (checkpoints run last)
        if self.kill_after is not None and trainer.global_step == self.kill_after:
            raise _Killed(f"killed after step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def _cli(save_dir: Path) -> PiggyCLI:
    args = [
        "--config", str(ROOT / "configs" / "treft_legal.yaml"),
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.init_args.every_n_train_steps", str(KILL_AFTER),
        "--trainer.callbacks.init_args.save_last", "true",
    ]  # fmt: skip
    return PiggyCLI(run=False, args=args)


def _fit(save_dir: Path, recorder: LossRecorder, ckpt_path: str | None = None) -> PiggyCLI:
    cli = _cli(save_dir)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli


def _trainable(cli: PiggyCLI) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}


def _answers(cli: PiggyCLI) -> dict[tuple[str, str], str]:
    path = Path(cli.trainer.log_dir) / "eval" / "fit_end" / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    answers = {(r["group"], r["question_id"]): r["response"] for r in records}
    assert len(answers) == len(records) > 0
    return answers


def test_shipped_config_killed_mid_epoch_resumes_bit_identically(tmp_path):
    full_losses = LossRecorder()
    full = _fit(tmp_path / "full", full_losses)
    assert sorted(full_losses.losses) == list(range(1, 52))

    cut = LossRecorder(kill_after=KILL_AFTER)
    with pytest.raises(_Killed):
        _fit(tmp_path / "cut", cut)
    assert sorted(cut.losses) == list(range(1, KILL_AFTER + 1))
    assert cut.losses == {s: full_losses.losses[s] for s in cut.losses}
    last = tmp_path / "cut" / "treft_legal" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == KILL_AFTER

    resumed_losses = LossRecorder()
    resumed = _fit(tmp_path / "cut", resumed_losses, ckpt_path=str(last))
    assert sorted(resumed_losses.losses) == list(range(KILL_AFTER + 1, 52))
    for step, loss in resumed_losses.losses.items():
        assert loss == full_losses.losses[step], f"step {step}: {loss!r} != {full_losses.losses[step]!r}"

    expected, got = _trainable(full), _trainable(resumed)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert _answers(resumed) == _answers(full)
