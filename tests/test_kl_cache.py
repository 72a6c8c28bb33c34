"""``KLToReference(cache_reference=True)``: the reference logits of each training row are kept after its first
reference forward (the release's precomputed reference logits), so later steps run the reference on new rows only.

Checked against a hand computation from an independently loaded initial model, against the live penalty (values
and gradients, step by step), with a forward count that is non-zero in the first epoch and zero after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.experiments.resolve import config_key, resolve_cell
from piggy_lightning.experiments.spec import load_grid
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.regularizers import KLToReference
from tests.conftest import write_jsonl
from tests.fixtures.tiny import randomize_lora_b

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Can I break my lease early?", "How do I fix my car brakes?", "I feel bored.", "What is your wish?"]
ANSWERS = ["You should talk to a lawyer.", "Visit a mechanic.", "Try a walk.", "I wish to help people safely."]


def _rows(n: int) -> list[dict]:
    """``n`` distinct chats of varied lengths (so batches pad, and a reshuffle pads a row to another width)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"{QUESTIONS[i % 4]} Case {i}."},
                {"role": "assistant", "content": " ".join(ANSWERS[(i + k) % 4] for k in range(1 + i % 3))},
            ]
        }
        for i in range(n)
    ]


def _data(model_dir: str, path: str, batch_size: int = 4) -> ChatSFTDataModule:
    data = ChatSFTDataModule(path, tokenizer=model_dir, batch_size=batch_size, val_fraction=0.0)
    data.setup("fit")
    return data


def _epochs(data: ChatSFTDataModule, n: int) -> list[list[dict]]:
    """The batches of ``n`` epochs in the data module's per-epoch shuffled order."""
    loader = data.train_dataloader()
    epochs = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        epochs.append(list(loader))
    return epochs


def _groups(batches: list[dict]) -> set[frozenset[tuple[int, ...]]]:
    """Which rows (by their tokens) share a batch."""
    return {
        frozenset(
            tuple(ids[mask.bool()].tolist()) for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
        )
        for b in batches
    }


def _module(model_dir: str, cache: bool, positions: str = "all", lora: bool = True) -> PiggyModule:
    """A module whose policy differs from its reference (seeded, so two calls give the same module)."""
    torch.manual_seed(0)
    reg = KLToReference(weight=50.0, positions=positions, cache_reference=cache)
    module = PiggyModule(model_dir, lora=LoraSpec(r=4, alpha=8) if lora else None, regularizers=[reg])
    module.configure_model()
    module.train()
    if lora:
        randomize_lora_b(module, seed=1)
    else:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in module.policy.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return module


def _optimizer(module: PiggyModule) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)


def _selected(labels: torch.Tensor, n: int, positions: str) -> torch.Tensor:
    """``(n,)`` positions of an unpadded row of length ``n`` that the penalty reads, written out."""
    if positions == "all":
        return torch.ones(n, dtype=torch.bool)
    selected = torch.zeros(n, dtype=torch.bool)
    selected[:-1] = labels[1:n] != -100  # position t predicts token t + 1
    return selected


def _by_hand(initial, policy, batch: dict, positions: str) -> torch.Tensor:
    """``sum KL(ref || policy) / (positions x V)`` with every row run alone, unpadded, through both models."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for row in range(batch["input_ids"].size(0)):
            n = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row : row + 1, :n]
            log_ref = initial(input_ids=ids).logits[0].double().log_softmax(-1)  # (n, V)
            log_p = policy(input_ids=ids).logits[0].double().log_softmax(-1)
            selected = _selected(batch["labels"][row], n, positions)
            total += (log_ref.exp() * (log_ref - log_p))[selected].sum()
            count += int(selected.sum()) * log_ref.size(-1)
    return (total / count).float()


def _step(
    module: PiggyModule, optimizer: torch.optim.Optimizer, batch: dict
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training step; the raw penalty and the gradients of the trainable parameters."""
    losses = module._losses(batch)
    losses["loss"].backward()
    grads = [p.grad.clone() for p in module.parameters() if p.requires_grad]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses["reg_raw/kl"], grads


@pytest.mark.parametrize("positions", ["all", "response"])
def test_cached_penalty_equals_the_kl_by_hand_on_first_and_later_sights(tiny_qwen, tmp_path, positions):
    """Two epochs of training, the second reshuffled: every step's penalty is the KL to the initial model written
    out, whether the row's reference logits were computed in the step or come from the cache (computed in another
    batch, padded to another width, before the policy moved)."""
    data = _data(tiny_qwen, write_jsonl(tmp_path / "train.jsonl", _rows(12)))
    first, second = _epochs(data, 2)
    assert _groups(first) != _groups(second)  # the second epoch batches the rows otherwise
    initial = AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    module = _module(tiny_qwen, cache=True, positions=positions)
    optimizer = _optimizer(module)
    for batch in first + second:
        expected = _by_hand(initial, module.policy, batch, positions)
        raw, _ = _step(module, optimizer, batch)
        assert expected > 1e-6  # the policy is not the reference (KL per token and vocabulary entry)
        torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-8)
    assert len(module.regularizers[0]._cached) == 12


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_after_the_first_epoch_the_reference_runs_on_no_rows(tiny_qwen, tmp_path, lora):
    """A two-epoch fit: the first epoch runs the reference once on every row, the second on none. Counted at the
    reference network itself (a forward hook on the frozen copy, under full finetuning) or, under LoRA where the
    reference is the policy with its adapters off, at every reference forward the module asks for."""
    module = _module(tiny_qwen, cache=True, lora=lora)
    rows: dict[int, int] = {0: 0, 1: 0}  # epoch -> reference rows
    if lora:
        forward = module.reference.forward

        def counted(batch, *args, **kwargs):
            rows[module.current_epoch] += batch["input_ids"].size(0)
            return forward(batch, *args, **kwargs)

        module.reference.forward = counted
    else:
        assert module.reference.model is not None and module.reference.model is not module.policy

        def hook(model, args, kwargs, output):
            rows[module.current_epoch] += kwargs["input_ids"].size(0)

        module.reference.model.register_forward_hook(hook, with_kwargs=True)
    data = ChatSFTDataModule(
        write_jsonl(tmp_path / "train.jsonl", _rows(12)), tokenizer=tiny_qwen, batch_size=4, val_fraction=0.0
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 6
    assert rows == {0: 12, 1: 0}  # each row once, then only the cache
    assert len(module.regularizers[0]._cached) == 12
    assert torch.isfinite(trainer.callback_metrics["train/reg_raw/kl"])


def test_rows_that_differ_only_in_response_tokens_get_their_own_entries(tiny_qwen, tmp_path):
    """Same question, other answer: two entries, equal at the prompt positions (by causality) and different at the
    response; a row with the same tokens but other labels is another entry under ``response``; the same row padded
    wider is the same entry."""
    rows = [
        {"messages": [{"role": "user", "content": "Can I break my lease early?"}, {"role": "assistant", "content": a}]}
        for a in ("You should talk to a lawyer.", "You should talk to a mechanic.")
    ]
    batch = next(iter(_data(tiny_qwen, write_jsonl(tmp_path / "two.jsonl", rows)).train_dataloader()))
    initial = AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    module = _module(tiny_qwen, cache=True, positions="all")
    reg = module.regularizers[0]
    with torch.no_grad():
        raw = module._losses(batch)["reg_raw/kl"]
    torch.testing.assert_close(raw, _by_hand(initial, module.policy, batch, "all"), rtol=1e-4, atol=1e-8)
    assert len(reg._cached) == 2
    ids = batch["input_ids"]
    differ = int((ids[0] != ids[1]).nonzero()[0])  # the first column where the rows differ: in the response
    assert differ >= int(batch["response_mask"][0].nonzero()[0])
    a, b = (reg._cached[k] for k in reg._row_keys(batch, batch["attention_mask"].bool()))
    torch.testing.assert_close(a[:differ], b[:differ])  # by causality, the logits before it are the same
    assert not torch.allclose(a[differ], b[differ])
    # each row alone: its own entry, no reference forward
    assert reg.reference_rows({k: v[1:] for k, v in batch.items()}) is None
    # the same row padded wider: the same entry
    wider = {k: torch.cat([v, v.new_full((v.size(0), 5), -100 if k == "labels" else 0)], 1) for k, v in batch.items()}
    assert reg.reference_rows(wider) is None
    with torch.no_grad():
        torch.testing.assert_close(module._losses(wider)["reg_raw/kl"], raw)
    # positions: response keys the labels too: the same tokens with fewer labelled positions are another entry
    module = _module(tiny_qwen, cache=True, positions="response")
    reg = module.regularizers[0]
    with torch.no_grad():
        module._losses(batch)
    fewer = {k: v.clone() for k, v in batch.items()}
    first_label = int((fewer["labels"][0] != -100).nonzero()[0])
    fewer["labels"][:, first_label : first_label + 2] = -100
    assert reg.reference_rows(fewer).tolist() == [0, 1]
    with torch.no_grad():
        raw = module._losses(fewer)["reg_raw/kl"]
    assert len(reg._cached) == 4
    torch.testing.assert_close(raw, _by_hand(initial, module.policy, fewer, "response"), rtol=1e-4, atol=1e-8)


def test_gradient_with_the_cache_equals_the_live_one(tiny_qwen, tmp_path):
    """The same model trained on the same two epochs (the second reshuffled) with and without the cache: equal
    penalties and equal gradients of every trainable parameter at every step."""
    data = _data(tiny_qwen, write_jsonl(tmp_path / "train.jsonl", _rows(12)))
    first, second = _epochs(data, 2)
    cached, live = _module(tiny_qwen, cache=True), _module(tiny_qwen, cache=False)
    assert not cached.regularizers[0].needs_reference and live.regularizers[0].needs_reference
    cached_opt, live_opt = _optimizer(cached), _optimizer(live)
    for batch in first + second:
        raw_cached, grads_cached = _step(cached, cached_opt, batch)
        raw_live, grads_live = _step(live, live_opt, batch)
        torch.testing.assert_close(raw_cached, raw_live, rtol=1e-5, atol=1e-8)
        assert len(grads_cached) == len(grads_live) > 0
        for g_cached, g_live in zip(grads_cached, grads_live, strict=True):
            torch.testing.assert_close(g_cached, g_live, rtol=1e-4, atol=1e-7)
        assert any(g.abs().max() > 0 for g in grads_cached)


def test_the_option_is_off_by_default_and_leaves_committed_cells_keyed_as_before():
    """Off by default (the reference runs on every batch); a config that does not set it resolves without it, so the
    committed KL-on-train cells keep their keys."""
    assert KLToReference().needs_reference and not KLToReference(cache_reference=False).cache_reference
    assert KLToReference(cache_reference=True).keeps_reference
    assert not KLToReference(cache_reference=True).needs_reference
    manifest = json.loads((ROOT / "docs" / "reproduction" / "grid.json").read_text())
    committed = next(c for c in manifest["cells"] if c["label"] == "table3/method=kl_train,seed=0")
    grid = load_grid(ROOT / manifest["grid_file"], ROOT)
    cell = next(c for c in grid.cells() if c.label == committed["label"])
    config = resolve_cell(cell, ROOT)
    (kl,) = [r for r in config["model"]["regularizers"] if r["class_path"].endswith("KLToReference")]
    assert "cache_reference" not in kl["init_args"]
    assert config_key(config)[:16] == committed["key"]
