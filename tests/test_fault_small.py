"""Small faults that used to surface late or not at all: an unwritable evaluation directory (found after training)
and a fit of zero epochs (exit 0, the untrained base reported as ``fit_end``)."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.cli import PiggyCLI
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.evaluation import Decoding, PromptList
from piggy_lightning.module import PiggyModule
from tests.test_eval_questions import FIXTURES
from tests.test_eval_resume import _LengthJudge

ROOT = Path(__file__).resolve().parents[1]


class _Steps(Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.n += 1


def _fit_with_evaluation(model_dir: str, data_file: str, tmp_path: Path, **evaluate_kwargs) -> _Steps:
    evaluate = Evaluate(
        [PromptList(str(FIXTURES / "prompts.json"), metrics=["aligned"])], [_LengthJudge()],
        Decoding(max_new_tokens=4, batch_size=8, progress=False), **evaluate_kwargs,
    )  # fmt: skip
    steps = _Steps()
    module = PiggyModule(model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = ChatSFTDataModule(data_file, tokenizer=model_dir, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, callbacks=[evaluate, steps], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    return steps


def test_an_unwritable_evaluation_directory_stops_the_fit_before_training(tiny_qwen, chat_file, tmp_path, monkeypatch):
    trained = []
    step = PiggyModule.training_step
    monkeypatch.setattr(PiggyModule, "training_step", lambda self, b, i: trained.append(i) or step(self, b, i))
    blocker = tmp_path / "a_file"  # a file where a directory should be: unwritable even for root
    blocker.write_text("not a directory")
    out = blocker / "eval"
    with pytest.raises(OSError, match=rf"cannot write its evaluation files in {out} \(") as caught:
        _fit_with_evaluation(tiny_qwen, chat_file, tmp_path, output_dir=str(out))
    assert "NotADirectoryError" in str(caught.value) or "FileExistsError" in str(caught.value)
    cache = blocker / "cache" / "judge.sqlite"
    with pytest.raises(OSError, match=rf"in {cache.parent} \("):
        _fit_with_evaluation(tiny_qwen, chat_file, tmp_path, output_dir=str(tmp_path / "eval"), judge_cache=str(cache))
    assert trained == [] and not list((tmp_path / "eval").iterdir())  # the test file is removed again

    steps = _fit_with_evaluation(tiny_qwen, chat_file, tmp_path, output_dir=str(tmp_path / "eval"))
    assert steps.n == 2 and (tmp_path / "eval" / "fit_end" / "summary.json").exists()
    assert not list((tmp_path / "eval").glob(".write_test*"))


@pytest.mark.parametrize("budget", [["--trainer.max_epochs", "0"], ["--trainer.limit_train_batches", "0"]])
def test_a_fit_that_trains_nothing_is_refused(budget, tmp_path):
    args = [
        "fit", "--config", str(ROOT / "configs" / "treft_legal.yaml"), *budget,
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=rf"trainer\.{budget[0].split('.')[-1]}=0 trains nothing"):
        PiggyCLI(args=args)
    assert not list(tmp_path.rglob("fit_end"))
