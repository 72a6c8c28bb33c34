"""The cross-entropy computes logits at the labelled positions only, and equals the full-logits loss."""

import pytest
import torch
import torch.nn.functional as F

from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.forward import ForwardRecord
from piggy_lightning.losses import record_cross_entropy, response_logits_mask, training_forwards
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule, response_cross_entropy
from piggy_lightning.regularizers import KLToReference


def _full_logits_ce(logits, labels):
    """The loss as it was: every ``(B, T-1, V)`` logit upcast, -100 ignored."""
    shift = logits[:, :-1].float()
    return F.cross_entropy(shift.reshape(-1, shift.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


def _module_and_batch(model_dir, chat_file, lora, regularizers=()):
    module = PiggyModule(model_dir, lora=LoraSpec(r=4, alpha=8) if lora else None, regularizers=list(regularizers))
    module.configure_model()
    with torch.no_grad():  # non-zero adapters, so LoRA's gradients reach both A and B
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.0)
    data.setup("fit")
    return module, next(iter(data.train_dataloader()))


def _grads(module):
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    module.policy.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("model_fixture", ["tiny_qwen", "tiny_llama"])
def test_response_only_logits_give_the_full_logits_loss_and_gradients(model_fixture, lora, request, chat_file):
    model_dir = request.getfixturevalue(model_fixture)
    module, batch = _module_and_batch(model_dir, chat_file, lora)
    policy_out, reference_out = training_forwards(module.policy, module.reference, [], batch)
    mask = response_logits_mask(batch["labels"])  # (B, T)
    assert reference_out is None
    assert policy_out.logits.dim() == 2 and policy_out.logits.size(0) == int(mask.sum()) < mask.numel()
    loss = record_cross_entropy(policy_out, batch["labels"])
    loss.backward()
    cheap = _grads(module)
    full = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    expected = _full_logits_ce(full.logits, batch["labels"])  # (B, T, V) as before
    expected.backward()
    reference = _grads(module)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert cheap.keys() == reference.keys() and cheap
    for name, grad in cheap.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(response_cross_entropy(full.logits, batch["labels"]), expected, rtol=0, atol=1e-6)


def test_module_loss_equals_the_full_logits_loss(tiny_qwen, chat_file):
    module, batch = _module_and_batch(tiny_qwen, chat_file, lora=True)
    with torch.no_grad():
        ce = module._losses(batch)["ce"]
        full = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ce, _full_logits_ce(full, batch["labels"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("positions", ["response", "all"])
def test_kl_reads_logits_where_it_declares_and_the_loss_is_unchanged(tiny_qwen, chat_file, positions):
    reg = KLToReference(positions=positions)
    module, batch = _module_and_batch(tiny_qwen, chat_file, lora=True, regularizers=[reg])
    with torch.no_grad():
        policy_out, reference_out = training_forwards(module.policy, module.reference, [reg], batch)
        full = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_full = module.reference.forward(batch)
    # logits exactly where the KL reads them: every attended position, or those predicting a response token
    read = batch["attention_mask"].bool() if positions == "all" else response_logits_mask(batch["labels"])
    assert torch.equal(policy_out.logits_mask, read) and policy_out.logits.size(0) == int(read.sum())
    assert torch.equal(reference_out.logits_mask, read) and reference_out.logits.size(0) == int(read.sum())
    assert int(read.sum()) < read.numel()  # padding (and, for "response", the prompt) gets no logits
    ce = record_cross_entropy(policy_out, batch["labels"])
    torch.testing.assert_close(ce, _full_logits_ce(full, batch["labels"]), rtol=0, atol=1e-6)
    expected = reg(batch, ForwardRecord(logits=full), ref_full)
    torch.testing.assert_close(reg(batch, policy_out, reference_out), expected, rtol=1e-5, atol=1e-8)
