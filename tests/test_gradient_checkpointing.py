"""Gradient checkpointing changes memory, not maths: with TReFT's recorded keys/values the gradients are the same."""

import torch

from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.regularizers import PrefixKVDrift
from piggy_lightning.sites import decoder_layers


def _grads(model_dir, batch, checkpointing: bool):
    torch.manual_seed(0)
    module = PiggyModule(
        model_dir, lora=LoraSpec(r=4, alpha=8), regularizers=[PrefixKVDrift(weight=5.0)],
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    module.configure_model()
    assert all(layer.gradient_checkpointing == checkpointing for layer in decoder_layers(module.policy))
    with torch.no_grad():  # move the adapters off zero so the prefix drift (and its gradient) is not trivially 0
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    module.policy.train()
    losses = module._losses(batch)
    losses["loss"].backward()
    assert losses["reg_raw/prefix_kv"] > 0
    return losses, {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}


def test_checkpointed_gradients_equal_plain_gradients(tiny_llama, chat_file):
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_llama, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    plain_losses, plain = _grads(tiny_llama, batch, checkpointing=False)
    ckpt_losses, ckpt = _grads(tiny_llama, batch, checkpointing=True)
    torch.testing.assert_close(ckpt_losses["loss"], plain_losses["loss"])
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)
    k_grads = [g for n, g in ckpt.items() if "k_proj.lora_B" in n]
    assert k_grads and all(g.abs().sum() > 0 for g in k_grads)
