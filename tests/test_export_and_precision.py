"""Exported adapters load in plain peft; bf16-mixed and gradient accumulation train."""

import lightning as L
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from piggy_lightning.callbacks import ExportPretrained
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule


def _trainer(tmp_path, **kwargs):
    settings = dict(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    return L.Trainer(**{**settings, **kwargs})


def test_exported_adapter_loads_in_plain_peft(tiny_qwen, chat_file, tmp_path):
    module = PiggyModule(tiny_qwen, lora=LoraSpec(r=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4)
    export = ExportPretrained(dirpath=str(tmp_path / "export"))
    _trainer(tmp_path, callbacks=[export]).fit(module, data)
    assert (tmp_path / "export" / "adapter_config.json").exists()
    assert (tmp_path / "export" / "adapter_model.safetensors").exists()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen), tmp_path / "export").eval()
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.policy(input_ids=ids).logits)


def test_bf16_mixed_and_gradient_accumulation(tiny_llama, chat_file, tmp_path):
    module = PiggyModule(tiny_llama, lora=LoraSpec(r=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_llama, batch_size=2)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = _trainer(tmp_path, precision="bf16-mixed", accumulate_grad_batches=2, max_steps=2)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and trainer.fit_loop.total_batch_idx + 1 == 4  # 2 micro-batches per step
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
