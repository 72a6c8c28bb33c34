"""Regularizers on the tiny models: each declared need is fulfilled by the module, and each penalty equals the drift
or KL written out by hand.

The cached prefix reference, the per-row reference of rows with their own system prompt, the shared one-example
reference and the retain set's batches and cached reference logits: no regularizer runs a forward itself.
"""

import pytest
import torch

from piggy_lightning.data import ChatSFTDataModule, collate
from piggy_lightning.drift import kv_needs, reference_kv, relative_drift, select_kv
from piggy_lightning.forward import run_forward
from piggy_lightning.losses import regularizer_inputs
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.regularizers import (
    KVDrift,
    PerRowPrefixKVDrift,
    PrefixKVDrift,
    RegularizerContext,
    RetainKL,
    SharedReferenceKVDrift,
)
from piggy_lightning.sites import decoder_layers, kv_projections
from tests.conftest import chat_rows, write_jsonl


def _module(model_dir, regularizers, lora=True):
    module = PiggyModule(model_dir, lora=LoraSpec(r=4, alpha=8) if lora else None, regularizers=regularizers)
    module.configure_model()
    return module


def _context(module, encode=None):
    return RegularizerContext(module.spans, module.tokenizer, 2, torch.device("cpu"), encode)


def _train_batch(model_dir, chat_file, batch_size=4):
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=batch_size, val_fraction=0.0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _perturb_lora(module, scale=0.3):
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def _count_reference_forwards(module):
    calls = []
    forward = module.reference.forward
    module.reference.forward = lambda batch, *a, **k: calls.append(batch["input_ids"].shape) or forward(batch, *a, **k)
    return calls


def _step(module, regs, batch):
    """One step's forwards as the module runs them; each regularizer's raw penalty."""
    _, inputs = regularizer_inputs(module.policy, module.reference, regs, batch)
    return [reg(i.batch, i.policy, i.reference) for reg, i in zip(regs, inputs, strict=True)]


def _by_hand_kv_drift(keys, values, ref_keys, ref_values, mask):
    """TReFT's L_KV written out: per layer, mean over the masked positions of ||x - r||^2 / ||r||^2 for keys plus
    the same for values, then the mean over layers. ``keys`` etc. are per-layer ``(B, T, D)`` lists."""
    per_layer = []
    for k, v, rk, rv in zip(keys, values, ref_keys, ref_values, strict=True):
        dk = ((k - rk) ** 2).sum(-1) / (rk**2).sum(-1)  # (B, T)
        dv = ((v - rv) ** 2).sum(-1) / (rv**2).sum(-1)
        per_layer.append(dk[mask].mean() + dv[mask].mean())
    return sum(per_layer) / len(per_layer)


def _raw_kv(model, batch):
    """Every layer's k_proj/v_proj outputs ``(B, T, D)`` from forward hooks, without the package's recording code."""
    keys, values, handles = [], [], []
    for layer in decoder_layers(model):
        handles.append(layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o.detach())))
        handles.append(layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o.detach())))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return keys, values


@pytest.mark.parametrize("model_fixture", ["tiny_qwen", "tiny_llama"])
@pytest.mark.parametrize("source", ["kv", "hidden"])
def test_cached_prefix_reference_equals_a_live_reference_forward(model_fixture, source, request, chat_file):
    model_dir = request.getfixturevalue(model_fixture)
    reg = PrefixKVDrift(source=source)
    module = _module(model_dir, [reg])
    batch = _train_batch(model_dir, chat_file)
    n = len(module.spans.anatomy.prefix_ids)
    assert reg.ref_keys.shape[:2] == (2, n) and "ref_keys" not in reg.state_dict()
    live = KVDrift(positions="prefix", source=source)
    live.setup(_context(module))
    # the drift monitor's path: projections applied by select_kv, not the module's records
    keys, values = reference_kv(module.reference, batch, [0, 1], source, lambda t: t[:, :n])  # (L, B, P, D)
    torch.testing.assert_close(keys, reg.ref_keys[:, None].expand_as(keys), rtol=0, atol=1e-6)
    torch.testing.assert_close(values, reg.ref_values[:, None].expand_as(values), rtol=0, atol=1e-6)
    _perturb_lora(module)
    calls = _count_reference_forwards(module)
    with torch.no_grad():
        cached, expected = _step(module, [reg, live], batch)
    assert len(calls) == 1  # the live regularizer's; the cached one runs none
    assert cached > 1e-3
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-6)
    # and independently: the policy's keys by select_kv's projections, drift written out by hand
    with torch.no_grad():
        record = run_forward(module.policy, batch, kv_needs(source))
        pk, pv = select_kv(record, [0, 1], source, lambda t: t[:, :n], kv_projections(module.policy))  # (L, B, P, D)
    prefix = torch.ones(pk.shape[1:3], dtype=torch.bool)  # (B, P)
    rk, rv = keys.unbind(0), values.unbind(0)
    by_hand = _by_hand_kv_drift(pk.unbind(0), pv.unbind(0), rk, rv, prefix)
    torch.testing.assert_close(cached, by_hand, rtol=1e-5, atol=1e-6)


def test_per_row_references_for_rows_with_their_own_system_prompt(tiny_qwen):
    """Row 1 has a custom system prompt: PrefixKVDrift refuses it, PerRowPrefixKVDrift pools it exactly like a live
    reference (and like the drift written out by hand), and the module runs the reference on row 1 only."""
    reg = PerRowPrefixKVDrift()
    strict = PrefixKVDrift(name="strict")
    module = _module(tiny_qwen, [reg, strict])
    assert reg.keeps_reference and not reg.needs_reference and not strict.keeps_reference
    live = KVDrift(positions="prefix")
    live.setup(_context(module))
    rows = chat_rows(3)
    rows[1]["messages"].insert(0, {"role": "system", "content": "You are a lawyer."})
    batch = collate([module.spans.tokenize(r["messages"]) for r in rows], module.tokenizer.pad_token_id)
    _perturb_lora(module)
    record = run_forward(module.policy, batch, frozenset({"kv"}))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        strict(batch, record, None)
    expected = live(batch, record, module.reference.forward(batch, live.needs))
    calls = _count_reference_forwards(module)
    with torch.no_grad():
        (value,) = _step(module, [reg], batch)
    assert len(calls) == 1 and calls[0][0] == 1  # one reference forward, of the mismatched row only
    assert calls[0][1] < batch["input_ids"].size(1)  # and on its prompt only
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    keys, values = _raw_kv(module.policy, batch)
    with module.reference.active() as base:
        ref_keys, ref_values = _raw_kv(base, batch)
    by_hand = _by_hand_kv_drift(keys, values, ref_keys, ref_values, batch["prefix_mask"])
    torch.testing.assert_close(value, by_hand, rtol=1e-5, atol=1e-6)
    clean = collate([module.spans.tokenize(rows[0]["messages"])] * 2, module.tokenizer.pad_token_id)
    with torch.no_grad():
        _step(module, [reg], clean)
    assert len(calls) == 1  # rows with the default prefix: no reference forward


def test_shared_postfix_reference_is_taken_once_from_the_first_row(tiny_qwen, chat_file):
    reg = SharedReferenceKVDrift(positions="postfix")
    module = _module(tiny_qwen, [reg])
    assert not reg.needs_reference and reg.keeps_reference and reg.name == "kv_postfix"
    batch = _train_batch(tiny_qwen, chat_file)
    calls = _count_reference_forwards(module)
    record = run_forward(module.policy, batch, reg.needs)
    reg.eval()  # a validation batch first (Lightning's sanity check) must not choose the example
    _step(module, [reg], batch)
    assert len(calls) == 1 and calls[0][0] == 1 and reg.ref_keys is None  # one row: row 0
    reg.train()
    (value,) = _step(module, [reg], batch)
    assert len(calls) == 2
    # by hand: every row's postfix K/V against row 0's reference K/V (policy == reference at init)
    mask = batch["postfix_mask"]
    n = int(mask[0].sum())
    ref = [(k[0][mask[0]], v[0][mask[0]]) for k, v in zip(record.keys, record.values, strict=True)]
    per_layer = [
        sum(relative_drift(k[r][mask[r]], rk).sum() + relative_drift(v[r][mask[r]], rv).sum() for r in range(4))
        / (4 * n)
        for k, v, (rk, rv) in zip(record.keys, record.values, ref, strict=True)
    ]
    torch.testing.assert_close(value, sum(per_layer) / 2)
    assert value > 0  # other queries change the postfix keys
    _step(module, [reg], batch)
    assert len(calls) == 2, "the shared reference is computed once"


def _retain_setup(model_dir, chat_file, **data_kwargs):
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.0, **data_kwargs)
    data.setup("fit")
    module = _module(model_dir, [])
    return data, module


def test_kl_on_retain_cycles_and_caches_reference_logits(tiny_qwen, chat_file, tmp_path):
    retain = write_jsonl(tmp_path / "retain.jsonl", chat_rows(5))
    data, module = _retain_setup(tiny_qwen, chat_file)
    reg = RetainKL(retain_data=retain, retain_batch_size=2, positions="all", reduction="token_mean")
    reg.setup(_context(module, data.encode))
    assert len(reg._batches) == 3
    calls = _count_reference_forwards(module)
    batch = next(iter(data.train_dataloader()))
    values = [_step(module, [reg], batch)[0] for _ in range(3)]
    assert len(calls) == 3 and max(v.abs().item() for v in values) < 1e-5  # policy == reference at init
    _perturb_lora(module)
    (value,) = _step(module, [reg], batch)  # the fourth step cycles back to batch 0, from the cache
    assert len(calls) == 3 and value > 1e-3
    # by hand: both models' full logits on retain batch 0, KL(ref || policy) per attended position
    retain0 = reg._batches[0]
    with torch.no_grad():
        logits = module.policy(input_ids=retain0["input_ids"], attention_mask=retain0["attention_mask"]).logits
        with module.policy.disable_adapter():
            initial = module.policy(input_ids=retain0["input_ids"], attention_mask=retain0["attention_mask"]).logits
    attended = retain0["attention_mask"].bool()
    p_ref = initial[attended].softmax(-1)  # (N, V)
    by_hand = (p_ref * (p_ref.log() - logits[attended].log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(value.detach(), by_hand, rtol=1e-4, atol=1e-7)
    value.backward()
    grads = [p.grad for n, p in module.policy.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(p.grad is None for p in module.policy.parameters() if not p.requires_grad)
    reg.eval()  # validation reuses the current retain batch and does not move the cycle on
    cursor = reg._cursor
    _step(module, [reg], batch)
    assert reg._cursor == cursor


def test_retain_rows_are_encoded_and_truncated_by_the_data_module(tiny_qwen, chat_file, tmp_path):
    """A retain row longer than the data module's max_length is cut exactly as a training row is."""
    rows = chat_rows(3)
    rows[1]["messages"][1]["content"] = " ".join(["You should talk to a lawyer."] * 40)  # far over 64 tokens
    retain = write_jsonl(tmp_path / "retain.jsonl", rows)
    data, module = _retain_setup(tiny_qwen, chat_file, max_length=64, truncation="truncate")
    reg = RetainKL(retain_data=retain, retain_batch_size=3)
    reg.setup(_context(module, data.encode))
    (retain_batch,) = reg._batches
    as_training = ChatSFTDataModule(retain, tokenizer=tiny_qwen, val_fraction=0.0, max_length=64)
    as_training.setup("fit")
    expected = collate(as_training.train_set, module.tokenizer.pad_token_id)
    assert retain_batch["input_ids"].size(1) == 64 and int(retain_batch["attention_mask"][1].sum()) == 64
    for key in expected:
        assert torch.equal(retain_batch[key], expected[key]), key
    full = module.spans.tokenize(rows[1]["messages"]).input_ids
    assert len(full) > 64 and retain_batch["input_ids"][1].tolist() == list(full[:64])
    with pytest.raises(ValueError, match="data module's encode"):
        RetainKL(retain_data=retain).setup(_context(module))
