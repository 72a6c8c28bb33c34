"""Training behaviour of PiggyModule: what changes, what stays frozen, what checkpoints hold, exact resume."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule, response_cross_entropy
from piggy_lightning.optim import CosineWithWarmup


class LossRecorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def _fit(
    model_dir, data_file, tmp_path, lora=True, max_steps=6, scheduler=None, module_class=PiggyModule, **trainer_kwargs
):
    module = module_class(
        model_dir,
        lora=LoraSpec(r=4, alpha=8) if lora else None,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        scheduler=scheduler,
    )
    data = ChatSFTDataModule(data_file, tokenizer=model_dir, batch_size=4, val_fraction=0.25)
    settings = dict(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer = L.Trainer(**{**settings, **trainer_kwargs})
    return module, data, trainer


def _snapshot(named):
    return {n: p.detach().clone() for n, p in named}


@pytest.mark.parametrize("model_fixture", ["tiny_qwen", "tiny_llama"])
def test_lora_changes_adapters_only_and_reference_is_the_base(model_fixture, request, chat_file, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    module, data, trainer = _fit(model_dir, chat_file, tmp_path)
    module.configure_model()
    before = _snapshot(module.policy.named_parameters())
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    ref_before = module.reference.forward(batch).logits
    trainer.fit(module, data)

    after = dict(module.policy.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in after.items():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    # the reference (adapters disabled) still computes the initial model exactly, and leaves modes untouched
    assert module.policy.training
    torch.testing.assert_close(module.reference.forward(batch).logits, ref_before, rtol=0, atol=0)
    assert module.policy.training
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for n, p in after.items() if n in trainable}


def test_full_finetuning_keeps_a_frozen_reference_copy(tiny_qwen, chat_file, tmp_path):
    module, data, trainer = _fit(tiny_qwen, chat_file, tmp_path, lora=False)
    module.configure_model()
    assert module.reference_model is not module.policy
    before = _snapshot(module.policy.named_parameters())
    ref_before = _snapshot(module.reference_model.named_parameters())
    trainer.fit(module, data)
    for name, p in module.policy.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    for name, p in module.reference_model.named_parameters():
        assert torch.equal(p, ref_before[name]) and not p.requires_grad
    assert not module.reference_model.training and all(not m.training for m in module.reference_model.modules())
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimizer_params & {id(p) for p in module.reference_model.parameters()}


def test_checkpoint_holds_only_trainable_tensors_and_resume_is_exact(tiny_qwen, chat_file, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    full = LossRecorder()
    L.seed_everything(0)
    module, data, trainer = _fit(
        tiny_qwen, chat_file, tmp_path, max_steps=-1, max_epochs=3, callbacks=[ckpt, full], enable_checkpointing=True
    )
    trainer.fit(module, data)
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    state = torch.load(first, weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), "checkpoint must hold the adapter only"
    assert set(state) == set(module.trainable_parameter_names)

    resumed = LossRecorder()
    L.seed_everything(0)
    module2, data2, trainer2 = _fit(tiny_qwen, chat_file, tmp_path, max_steps=-1, max_epochs=3, callbacks=[resumed])
    trainer2.fit(module2, data2, ckpt_path=first)
    assert min(resumed.losses) == min(s for s in full.losses if s > 5)  # resumes at the step after epoch 0
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-6), f"step {step}"


def test_response_cross_entropy_ignores_masked_positions():
    """Logits favour token 1 everywhere; only position 1 -> label 1 and position 2 -> label 0 count.

    p(1) = e^2 / (e^2 + 1) per position, so CE = [-log p(1) - log (1 - p(1))] / 2.
    """
    logits = torch.tensor([[[0.0, 2.0]] * 4])  # (1, 4, 2)
    labels = torch.tensor([[-100, -100, 1, 0]])
    p1 = torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 1)
    expected = (-torch.log(p1) - torch.log(1 - p1)) / 2
    torch.testing.assert_close(response_cross_entropy(logits, labels), expected)


# constant: the original case; cosine: the step count comes from an epoch budget as in the shipped configs, read in
# configure_optimizers, which builds the loader before the restore (Lightning #20550: the data module's own copy of
# the position must reach it)
@pytest.mark.parametrize(
    ("scheduler", "budget", "total"),
    [(None, {"max_steps": 12}, 12), (CosineWithWarmup(warmup_steps=2), {"max_steps": -1, "max_epochs": 3}, 15)],
    ids=["constant", "cosine"],
)
def test_resume_from_a_mid_epoch_checkpoint_continues_the_same_batches(
    tiny_qwen, chat_file, tmp_path, scheduler, budget, total
):
    """18 training rows / 4 = 5 batches per epoch; a checkpoint at step 3 is mid-epoch 0, one at step 7 mid-epoch 1,
    and those at steps 5 and 10 were saved at an epoch's last batch (they resume at the next epoch's first batch,
    where torchdata alone would skip the whole next epoch)."""
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1, save_on_train_epoch_end=False
    )
    full = LossRecorder()
    L.seed_everything(0)
    module, data, trainer = _fit(
        tiny_qwen, chat_file, tmp_path, scheduler=scheduler, callbacks=[ckpt, full], enable_checkpointing=True,
        **budget,
    )  # fmt: skip
    trainer.fit(module, data)
    if scheduler is not None:  # the schedule spans the trainer's step count: lr 0 after the last of 15 steps
        assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [0.0]
    for step in (3, 7, 5, 10):
        resumed = LossRecorder()
        L.seed_everything(0)
        module2, data2, trainer2 = _fit(
            tiny_qwen, chat_file, tmp_path, scheduler=scheduler, callbacks=[resumed], **budget
        )
        trainer2.fit(module2, data2, ckpt_path=next((tmp_path / "ckpt").glob(f"*step={step}.ckpt")))
        assert sorted(resumed.losses) == list(range(step + 1, total + 1))
        for s, loss in resumed.losses.items():
            assert loss == pytest.approx(full.losses[s], abs=1e-6), f"resumed at {step}: step {s}"


class _EarlyEstimate(PiggyModule):
    """Reads the step estimate in configure_optimizers, which builds the train loader before a restore."""

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches == 15  # 3 epochs x 5 batches: needs the loader
        return super().configure_optimizers()


class _PositionNotKept(ChatSFTDataModule):
    """A data module that leaves the loader's position to Lightning's fit loop alone (no state of its own)."""

    def state_dict(self):
        return {}


def test_a_loader_built_before_the_restore_fails_loudly_instead_of_restarting_the_epoch(tiny_qwen, chat_file, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    L.seed_everything(0)
    module, data, trainer = _fit(
        tiny_qwen, chat_file, tmp_path, max_steps=3, callbacks=[ckpt], enable_checkpointing=True
    )
    trainer.fit(module, data)
    ckpt_path = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    module2, _, trainer2 = _fit(tiny_qwen, chat_file, tmp_path, max_steps=-1, max_epochs=3, module_class=_EarlyEstimate)
    data2 = _PositionNotKept(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25)
    with pytest.raises(RuntimeError, match="resumes 3 batches into epoch 0.*built before the checkpoint was restored"):
        trainer2.fit(module2, data2, ckpt_path=ckpt_path)

    full = LossRecorder()  # the same early build with the data module's own copy of the position: continues exactly
    L.seed_everything(0)
    module3, data3, trainer3 = _fit(tiny_qwen, chat_file, tmp_path, max_steps=-1, max_epochs=3, callbacks=[full])
    trainer3.fit(module3, data3)
    resumed = LossRecorder()
    module4, data4, trainer4 = _fit(
        tiny_qwen, chat_file, tmp_path, max_steps=-1, max_epochs=3, callbacks=[resumed], module_class=_EarlyEstimate
    )
    trainer4.fit(module4, data4, ckpt_path=ckpt_path)
    assert sorted(resumed.losses) == list(range(4, 16))
    assert all(resumed.losses[s] == pytest.approx(full.losses[s], abs=1e-6) for s in resumed.losses)
