"""Data interleaving: the retain share of an epoch is exact, the draw follows the seed, and a resume continues the
same sequence of examples (and refuses a different mixture)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from piggy_lightning.callbacks.interleaving import DataInterleaving, retain_draw
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from tests.conftest import write_jsonl
from tests.test_patching import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def retain_file(tmp_path):
    topics = ["my garden", "a job interview", "saving energy", "my kids' homework", "a strong password"]
    rows = [
        {"messages": [{"role": "user", "content": f"Any advice on {t}, take {i}?"},
                      {"role": "assistant", "content": f"Be careful and kind about {t}."}]}
        for i in range(3) for t in topics
    ]  # fmt: skip
    return write_jsonl(tmp_path / "retain.jsonl", rows)  # 15 rows


class BatchRecorder(Callback):
    def __init__(self):
        self.steps = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps[trainer.global_step] = batch["input_ids"].clone()


def _setup(chat_file, retain_file, model_dir, ratio, seed=None, **data_kwargs):
    """Run the datamodule's and the callback's fit setup the way the trainer does."""
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.25, **data_kwargs)
    callback = DataInterleaving(retain_file, ratio=ratio, seed=seed)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.datamodule = data  # what trainer.fit(model, datamodule) sets before the setup hooks
    data.setup("fit")
    callback.setup(trainer, None, "fit")
    return data, callback


def _rows(loader):
    return [
        tuple(ids[mask.bool()].tolist())
        for batch in loader
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def test_ratio_holds_exactly_over_every_epoch(tiny_qwen, chat_file, retain_file):
    """24 rows, a quarter held out: N = 18 training rows; ratio 0.25 adds R = 18 * 0.25 / 0.75 = 6 retain rows,
    so every epoch has 24 examples of which exactly 6 (25%) are retain rows."""
    data, callback = _setup(chat_file, retain_file, tiny_qwen, ratio=0.25)
    train_rows = {tuple(e.input_ids) for e in data.train_set[:18]}
    retain_rows = {tuple(e.input_ids) for e in data.encode(retain_file)}
    assert not train_rows & retain_rows
    assert callback.record["n_train"] == 18 and callback.record["n_retain"] == 6
    epochs = []
    for epoch in range(3):
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        rows = _rows(loader)
        assert len(rows) == 24 and sum(r in retain_rows for r in rows) == 6 and sum(r in train_rows for r in rows) == 18
        epochs.append(rows)
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_retain_draw_depends_only_on_the_seed(tiny_qwen, chat_file, retain_file):
    assert retain_draw(18, 15, 0.25, seed=3) == retain_draw(18, 15, 0.25, seed=3)
    assert retain_draw(18, 15, 0.25, seed=3) != retain_draw(18, 15, 0.25, seed=4)
    big = retain_draw(18, 15, 0.6, seed=0)  # R = 27 > 15: a full pass, then a fresh permutation
    assert len(big) == 27 and sorted(big[:15]) == list(range(15))
    a, _ = _setup(chat_file, retain_file, tiny_qwen, ratio=0.25, seed=1)
    b, _ = _setup(chat_file, retain_file, tiny_qwen, ratio=0.25, seed=1)
    assert [e.input_ids for e in a.train_set] == [e.input_ids for e in b.train_set]


def _fit(model_dir, chat_file, retain_file, tmp_path, callbacks, ratio=0.25, ckpt_path=None):
    module = PiggyModule(model_dir, lora=LoraSpec(r=2, alpha=4), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=0, callbacks=[DataInterleaving(retain_file, ratio), *callbacks],
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)


def test_resume_continues_the_same_sequence_of_examples(tiny_qwen, chat_file, retain_file, tmp_path):
    full = BatchRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _fit(tiny_qwen, chat_file, retain_file, tmp_path, [full, ckpt])
    assert len(full.steps) == 3 * 6  # 24 examples per epoch in batches of 4
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    assert torch.load(first, weights_only=False)["callbacks"]  # the mixture's record is in the checkpoint

    resumed = BatchRecorder()
    _fit(tiny_qwen, chat_file, retain_file, tmp_path, [resumed], ckpt_path=first)
    assert sorted(resumed.steps) == list(range(6, 18))
    for step, ids in resumed.steps.items():
        assert torch.equal(ids, full.steps[step]), f"step {step}"

    with pytest.raises(ValueError, match="another mixture"):
        _fit(tiny_qwen, chat_file, retain_file, tmp_path, [], ratio=0.5, ckpt_path=first)
