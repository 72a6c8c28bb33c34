"""KVDriftMonitor: per-layer prefix K/V drift logged to TensorBoard during plain SFT (lambda = 0)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from piggy_lightning.callbacks.drift_monitor import KVDriftMonitor
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.drift import kv_needs, reference_kv, relative_drift, select_kv
from piggy_lightning.forward import run_forward
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.sites import kv_projections


@pytest.mark.parametrize("source", ["kv", "hidden"])
def test_monitor_logs_per_layer_drift_every_n_steps(tiny_qwen, chat_file, tmp_path, source):
    monitor = KVDriftMonitor(every_n_steps=2, source=source)
    module = PiggyModule(tiny_qwen, lora=LoraSpec(r=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.0)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, accumulate_grad_batches=2, logger=logger, callbacks=[monitor],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)

    assert [step for step, _ in monitor.history] == [0, 2, 4]  # once per optimizer step despite accumulation
    first, last = monitor.history[0][1], monitor.history[-1][1]
    assert first["drift/prefix_kv"] == 0.0 and last["drift/prefix_kv"] > 0
    layer_means = [last[f"drift/prefix_{kv}/layer_{i:02d}"] for kv in "kv" for i in range(2)]
    assert last["drift/prefix_kv"] == pytest.approx(sum(layer_means) / 2)

    # the logged value is the drift of the trained policy against the initial model, computed independently
    ids = torch.tensor(module.spans.anatomy.prefix_ids)[None]
    prefix = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref_k, _ = reference_kv(module.reference, prefix, [0], source, lambda t: t[0])  # (1, P, D)
    with torch.no_grad():
        record = run_forward(module.policy, prefix, kv_needs(source))
        policy_k, _ = select_kv(record, [0], source, lambda t: t[0], kv_projections(module.policy))
    expected = relative_drift(policy_k, ref_k).mean().item()
    assert expected == pytest.approx(last["drift/prefix_k/layer_00"], rel=1e-5)

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"drift/prefix_kv", "drift/prefix_k/layer_00", "drift/prefix_v/layer_01"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("drift/prefix_k/layer_01")] == [0, 2, 4]
    assert "drift/prefix_kv_positions" in tags["histograms"] and "drift/prefix_kv_layers" in tags["images"]


def test_monitor_requires_a_piggy_module():
    class Plain(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="PiggyModule"):
        KVDriftMonitor().on_fit_start(None, Plain())
    with pytest.raises(ValueError, match="every_n_steps"):
        KVDriftMonitor(every_n_steps=0)
