"""Regularizers inside a fit: no reference forward for prefix TReFT, logged metrics, frozen reference, less drift."""

import lightning as L
import pytest
import torch

from piggy_lightning.callbacks.drift_monitor import KVDriftMonitor
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.modeling import LoraSpec, load_causal_lm
from piggy_lightning.module import PiggyModule
from piggy_lightning.reference import Reference
from piggy_lightning.regularizers import (
    HiddenStateDrift,
    KLToReference,
    KVDrift,
    PrefixKVDrift,
    Regularizer,
    RegularizerContext,
    RetainKL,
)
from tests.conftest import chat_rows, write_jsonl


def _fit(model_dir, data_file, tmp_path, regularizers, lora=True, max_steps=3, lr=1e-2, callbacks=None):
    module = PiggyModule(
        model_dir,
        lora=LoraSpec(r=4, alpha=8) if lora else None,
        regularizers=regularizers,
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
    )
    data = ChatSFTDataModule(data_file, tokenizer=model_dir, batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
    )  # fmt: skip
    return module, data, trainer


def _count_reference_forwards(module):
    calls = []
    forward = module.reference.forward
    module.reference.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    return calls


def test_prefix_treft_runs_no_reference_forward_per_step(tiny_llama, chat_file, tmp_path):
    module, data, trainer = _fit(tiny_llama, chat_file, tmp_path, [PrefixKVDrift(weight=5.0)], max_steps=4)
    module.configure_model()  # set-up: the one reference forward over the prefix happens here
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    ref_before = module.reference.forward(batch, frozenset({"kv"}))
    calls = _count_reference_forwards(module)
    trainer.fit(module, data)
    assert trainer.global_step == 4 and calls == []
    assert trainer.callback_metrics["train/reg_raw/prefix_kv"] > 0
    ref_after = module.reference.forward(batch, frozenset({"kv"}))  # the adapter-disabled base is bit-identical
    assert torch.equal(ref_after.logits, ref_before.logits)
    assert all(torch.equal(a, b) for a, b in zip(ref_after.keys, ref_before.keys, strict=True))


def test_regularizers_compose_log_and_keep_the_reference_frozen(tiny_qwen, chat_file, tmp_path):
    retain = write_jsonl(tmp_path / "retain.jsonl", chat_rows(6))
    regs = [
        PrefixKVDrift(weight=2.0),
        KVDrift(weight=1.0, positions="query", source="hidden"),
        KLToReference(weight=0.5, name="kl_train"),
        RetainKL(weight=0.5, name="kl_retain", retain_data=retain, retain_batch_size=3),
        HiddenStateDrift(weight=0.0, layers=[1]),
    ]
    module, data, trainer = _fit(tiny_qwen, chat_file, tmp_path, regs, lora=False)
    # RetainKL reads its set through the trainer's data module, so the module is built inside the fit; before it,
    # policy and reference are the initial weights
    ref_before = {n: p.detach().clone() for n, p in load_causal_lm(tiny_qwen).named_parameters()}
    before = ref_before
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for reg in regs:
        assert f"train/reg/{reg.name}" in metrics and f"train/reg_raw/{reg.name}" in metrics, reg.name
    assert metrics["train/reg/hidden"] == 0 and metrics["train/reg_raw/hidden"] > 0  # lambda = 0 still logs raw
    torch.testing.assert_close(metrics["train/reg/prefix_kv"], 2 * metrics["train/reg_raw/prefix_kv"])
    for name, p in module.reference_model.named_parameters():
        assert torch.equal(p, ref_before[name]) and not p.requires_grad and p.grad is None, name
    assert not module.reference_model.training
    assert all(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    for reg in regs:  # pure: no network held, as a submodule or otherwise
        assert list(reg.modules()) == [reg], reg.name
        assert not any(isinstance(v, (torch.nn.Module, Reference)) for v in vars(reg).values()), reg.name


class _Recorder(Regularizer):
    """Records what ``setup`` receives; adds nothing to the loss."""

    def __init__(self) -> None:
        super().__init__(weight=0.0, name="recorder")
        self.contexts = []

    def setup(self, context) -> None:
        self.contexts.append(context)

    def forward(self, batch, policy, reference):
        return policy.logits.new_zeros(())


def test_setup_receives_the_typed_context_not_the_module(tiny_qwen, chat_file, tmp_path):
    outside = _Recorder()
    PiggyModule(tiny_qwen, regularizers=[outside]).configure_model()
    (context,) = outside.contexts
    assert type(context) is RegularizerContext and context.encode is None  # no trainer, no data module
    recorder = _Recorder()
    module, data, trainer = _fit(tiny_qwen, chat_file, tmp_path, [recorder], max_steps=1)
    trainer.fit(module, data)
    (context,) = recorder.contexts
    assert type(context) is RegularizerContext and not isinstance(context, L.LightningModule)
    assert not any(isinstance(v, (torch.nn.Module, Reference, L.LightningModule)) for v in vars(context).values())
    assert not hasattr(context, "policy") and not hasattr(context, "reference")
    assert context.encode == data.encode  # the data module's own encoder, bound to it
    assert context.spans is module.spans and context.tokenizer is module.tokenizer
    assert context.n_layers == 2 and context.device == torch.device("cpu")


@pytest.mark.parametrize("lora", [True, False])
def test_gradients_reach_only_trainable_parameters(tiny_qwen, chat_file, lora):
    regs = [PrefixKVDrift(weight=10.0), KVDrift(positions="prompt"), KLToReference(), HiddenStateDrift()]
    module = PiggyModule(tiny_qwen, lora=LoraSpec(r=4, alpha=8) if lora else None, regularizers=regs)
    module.configure_model()
    with torch.no_grad():  # move off the initial point so that every penalty has a gradient
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module._losses(batch)["loss"].backward()
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    if not lora:
        assert all(p.grad is None for p in module.reference_model.parameters())


def test_treft_reduces_prefix_drift_compared_with_plain_sft(tiny_qwen, chat_file, tmp_path):
    drift = {}
    for label, regs in (("sft", []), ("treft", [PrefixKVDrift(weight=100.0)])):
        L.seed_everything(0)
        monitor = KVDriftMonitor(every_n_steps=6)
        module, data, trainer = _fit(tiny_qwen, chat_file, tmp_path, regs, max_steps=6, callbacks=[monitor])
        trainer.fit(module, data)
        drift[label] = monitor.history[-1][1]["drift/prefix_kv"]
        assert monitor.history[0][1]["drift/prefix_kv"] == 0.0
    assert drift["sft"] > 1e-3
    assert drift["treft"] < 0.5 * drift["sft"], drift
