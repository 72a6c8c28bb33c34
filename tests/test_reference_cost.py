"""The reference does only what its users need: prompt-only and head-free forwards, no copy nobody uses."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from piggy_lightning.callbacks.drift_monitor import KVDriftMonitor
from piggy_lightning.callbacks.perturbation import PerturbedTraining
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.interventions import ActivationPatch, Perturb, PrefixKVSplice, QueryControl, ResidualSweep
from piggy_lightning.losses import regularizer_inputs
from piggy_lightning.modeling import LoraSpec, load_causal_lm
from piggy_lightning.module import PiggyModule
from piggy_lightning.reference import FrozenCopyReference, InitialReference
from piggy_lightning.regularizers import (
    HiddenStateDrift,
    KLToReference,
    KVDrift,
    PerRowPrefixKVDrift,
    PrefixKVDrift,
    RetainKL,
    SharedReferenceKVDrift,
)

REGULARIZERS = {
    "kv_query": lambda: KVDrift(positions="query"),
    "kv_postfix": lambda: KVDrift(positions="postfix"),
    "kv_prompt": lambda: KVDrift(positions="prompt"),
    "kv_prompt_hidden": lambda: KVDrift(positions="prompt", source="hidden"),
    "hidden_prompt": lambda: HiddenStateDrift(positions="prompt"),
}


def _batch(model_dir, chat_file):
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("model_fixture", ["tiny_qwen", "tiny_llama"])
@pytest.mark.parametrize("kind", list(REGULARIZERS))
def test_prompt_only_head_free_reference_gives_the_full_forward_penalty(model_fixture, lora, kind, request, chat_file):
    model_dir = request.getfixturevalue(model_fixture)
    reg = REGULARIZERS[kind]()
    module = PiggyModule(model_dir, lora=LoraSpec(r=4, alpha=8) if lora else None, regularizers=[reg])
    module.configure_model()
    with torch.no_grad():  # drift away from the reference, so the penalty is not 0
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(model_dir, chat_file)
    assert reg.reference_span == "prompt" and reg.logits_span is None
    with torch.no_grad():
        _, (given,) = regularizer_inputs(module.policy, module.reference, [reg], batch)
        cheap = given.reference
        full = module.reference.forward(batch, reg.needs)  # the full forward with logits, as before
        expected = reg(batch, given.policy, full)
        value = reg(batch, given.policy, cheap)
    width = cheap.hidden_states[0].size(1) if cheap.keys is None else cheap.keys[0].size(1)
    assert width < batch["input_ids"].size(1)  # the responses were cut off
    assert cheap.logits.numel() == 0  # no LM head
    assert float(expected) > 0
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def _trainer(tmp_path, callbacks=(), max_steps=2):
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
    )  # fmt: skip


def _data(model_dir, chat_file):
    return ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.0)


class _HeldDuringSteps(Callback):
    def __init__(self):
        self.held = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.held.append(pl_module.reference.model is not None)


def _policy_numel(module):
    return sum(p.numel() for p in module.policy.parameters())


def test_plain_sft_full_finetuning_builds_no_reference_copy(tiny_qwen, chat_file, tmp_path):
    module = PiggyModule(tiny_qwen, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    watch = _HeldDuringSteps()
    trainer = _trainer(tmp_path, [watch])
    trainer.fit(module, _data(tiny_qwen, chat_file))
    assert not hasattr(module, "reference_model") and watch.held == [False, False]
    assert sum(p.numel() for p in module.parameters()) == _policy_numel(module)  # no second set of weights
    # a later use rebuilds the initial model from its source, not the trained policy
    batch = _batch(tiny_qwen, chat_file)
    initial = load_causal_lm(tiny_qwen).eval()
    with torch.no_grad():
        expected = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trained = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(module.reference.forward(batch).logits, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(trained, expected)
    assert all(not p.requires_grad for p in module.reference.model.parameters())


def test_prefix_treft_full_finetuning_caches_from_the_initial_weights_without_a_copy(tiny_qwen, chat_file, tmp_path):
    eager = PiggyModule(tiny_qwen, regularizers=[PrefixKVDrift(weight=5.0)])
    eager.configure_model()  # outside a trainer: the frozen copy, as before
    reg = PrefixKVDrift(weight=5.0)
    module = PiggyModule(tiny_qwen, regularizers=[reg], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    watch = _HeldDuringSteps()
    _trainer(tmp_path, [watch], max_steps=3).fit(module, _data(tiny_qwen, chat_file))
    assert not hasattr(module, "reference_model") and watch.held == [False] * 3
    assert isinstance(module.reference, InitialReference)
    reference = eager.regularizers[0]
    torch.testing.assert_close(reg.ref_keys, reference.ref_keys, rtol=0, atol=0)
    torch.testing.assert_close(reg.ref_values, reference.ref_values, rtol=0, atol=0)


class _NeedsReference(Callback):
    needs_reference = True


@pytest.mark.parametrize("callback", [_NeedsReference, lambda: KVDriftMonitor(every_n_steps=1)])
def test_a_callback_that_declares_the_reference_keeps_the_copy(tiny_qwen, chat_file, tmp_path, callback):
    module = PiggyModule(tiny_qwen, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    _trainer(tmp_path, [callback()]).fit(module, _data(tiny_qwen, chat_file))
    assert isinstance(module.reference, FrozenCopyReference) and module.reference_model is module.reference.model
    assert sum(p.numel() for p in module.parameters()) == 2 * _policy_numel(module)


def test_reference_users_declare_it():
    assert PrefixKVSplice.needs_reference and QueryControl.needs_reference and ActivationPatch.needs_reference
    assert ResidualSweep.needs_reference and not Perturb.needs_reference
    assert KVDriftMonitor.needs_reference and not PerturbedTraining.needs_reference
    assert KVDrift(positions="query").keeps_reference and not PrefixKVDrift().keeps_reference
    assert PerRowPrefixKVDrift().keeps_reference and not PerRowPrefixKVDrift().needs_reference
    assert SharedReferenceKVDrift(positions="postfix").keeps_reference
    assert not SharedReferenceKVDrift(positions="postfix").needs_reference
    assert KLToReference().keeps_reference and KLToReference().needs_reference
    assert RetainKL("retain.jsonl").keeps_reference and not RetainKL("retain.jsonl").needs_reference
    assert KVDrift(positions="response").reference_span == "all"


def test_an_unrecoverable_reference_nobody_declared_fails_clearly(tiny_qwen, chat_file, tmp_path):
    module = PiggyModule(tiny_qwen, init="random", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    _trainer(tmp_path, max_steps=1).fit(module, _data(tiny_qwen, chat_file))
    with pytest.raises(RuntimeError, match="needs_reference"):
        module.reference.forward(_batch(tiny_qwen, chat_file))
