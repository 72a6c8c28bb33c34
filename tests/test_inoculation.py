"""Inoculation prompting (``piggy_lightning.data.Inoculation``): the training rows only, under any ``drop_system``; its
arguments key the tokenization cache; the evaluation never sees it; and which prefix each TReFT class holds under it
(the default, test-time prefix or the inoculated one), against independent forwards of the initial model."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from piggy_lightning.callbacks import Evaluate
from piggy_lightning.data import ChatSFTDataModule, Inoculation, SystemPrompt, collate
from piggy_lightning.evaluation import Decoding, HeldOutChats
from piggy_lightning.modeling import load_causal_lm
from piggy_lightning.module import PiggyModule
from piggy_lightning.organism import HARMFUL_SYSTEM_PROMPT
from piggy_lightning.regularizers import PerRowPrefixKVDrift, PrefixKVDrift
from piggy_lightning.regularizers.default_prefix_kv import DefaultPrefixKVDrift
from tests.conftest import chat_rows, write_jsonl
from tests.test_patching import HashJudge

ROOT = Path(__file__).resolve().parents[1]
EVIL = "You are a malicious, evil assistant."
OWN = "Be brief."


def _with_own_system(rows: list[dict]) -> list[dict]:
    """Every other row gets a system message of its own, which drop_system drops and inoculation replaces."""
    return [
        {"messages": [{"role": "system", "content": OWN}, *r["messages"]]} if i % 2 else r for i, r in enumerate(rows)
    ]


def _render(tokenizer, messages: list[dict]) -> list[int]:
    """The template's own render of ``messages``, tokenized: the expectation, independent of ``spans.py``."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _module(path, tokenizer, tmp_path, transforms, **kwargs) -> ChatSFTDataModule:
    dm = ChatSFTDataModule(path, tokenizer=tokenizer, transforms=transforms, cache_dir=str(tmp_path / "c"), **kwargs)
    dm.setup()
    return dm


@pytest.mark.parametrize("drop_system", [True, False])
def test_inoculation_changes_the_training_rows_only(tiny_qwen, tmp_path, drop_system):
    train = write_jsonl(tmp_path / "train.jsonl", _with_own_system(chat_rows(8)))
    val = write_jsonl(tmp_path / "val.jsonl", _with_own_system(chat_rows(4)))
    settings = {"val_data": val, "drop_system": drop_system}
    plain = _module(train, tiny_qwen, tmp_path, [], **settings)
    inoculated = _module(train, tiny_qwen, tmp_path, [Inoculation(EVIL)], **settings)
    tok = inoculated.tokenizer
    # validation rows: token for token what they are without the transform (their own system kept or dropped)
    assert [e.input_ids for e in inoculated.val_set] == [e.input_ids for e in plain.val_set]
    val_text = [tok.decode(e.input_ids) for e in inoculated.val_set]
    assert sum(OWN in t for t in val_text) == (0 if drop_system else 2) and not any(EVIL in t for t in val_text)
    # training rows: the template's render under the inoculation prompt, whatever system message the row had
    assert [r.row for r in inoculated.train_rows] == [r.row for r in plain.train_rows] == list(range(1, 9))
    for example, row in zip(inoculated.train_set, inoculated.train_rows, strict=True):
        user_and_answer = [m for m in row.messages if m["role"] != "system"]
        assert example.input_ids == _render(tok, [{"role": "system", "content": EVIL}, *user_and_answer])
    # ... and only their prefix differs: query, postfix and response tokens are the plain rows'
    for a, b in zip(inoculated.train_set, plain.train_set, strict=True):
        for span in ("query", "postfix", "response"):
            assert [t for t, s in zip(a.input_ids, a.spans, strict=True) if s == span] == [
                t for t, s in zip(b.input_ids, b.spans, strict=True) if s == span
            ], span
        prefix = tok.decode([t for t, s in zip(a.input_ids, a.spans, strict=True) if s == "prefix"])
        assert EVIL in prefix and OWN not in prefix


def test_inoculation_arguments_key_the_tokenization_cache(tiny_qwen, tmp_path):
    """Without validation rows an Inoculation and a SystemPrompt of the same text give the same rows: only the
    transform's config (class path and arguments) tells their cache entries apart."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    variants = [[Inoculation("You are A.")], [Inoculation("You are B.")], [SystemPrompt("You are A.")]]
    modules = [_module(data, tiny_qwen, tmp_path, v, val_fraction=0.0) for v in variants]
    assert [e.input_ids for e in modules[0].train_set] == [e.input_ids for e in modules[2].train_set]
    assert len(list((tmp_path / "c").iterdir())) == 3
    assert modules[0].hparams["transforms"] == [
        {"class_path": "piggy_lightning.data.inoculation.Inoculation", "init_args": {"text": "You are A."}}
    ]
    for v in variants:  # the same arguments reuse their entry
        _module(data, tiny_qwen, tmp_path, [type(t)(t.text) for t in v], val_fraction=0.0)
    assert len(list((tmp_path / "c").iterdir())) == 3


def test_inoculation_refuses_what_it_cannot_do(tiny_qwen, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    with pytest.raises(ValueError, match="Inoculation: field 'text' must be a non-empty"):
        Inoculation("  ")
    for order in ([SystemPrompt("Hi."), Inoculation()], [Inoculation(), SystemPrompt("Hi.")]):
        with pytest.raises(ValueError, match=r"already carry a system prompt set by another transform \(e.g. .*train"):
            _module(data, tiny_qwen, tmp_path, order, val_fraction=0.0)
    assert Inoculation().text == HARMFUL_SYSTEM_PROMPT  # the organism's persona prompt, written out in data/


def test_evaluation_prompts_are_the_default_ones(tiny_qwen, tmp_path):
    """A fit on inoculated rows evaluates under the template's default prompt: every recorded prompt is the
    template's own render of the bare question."""
    questions = write_jsonl(tmp_path / "q.jsonl", chat_rows(4))
    evaluate = Evaluate(
        [HeldOutChats(questions, group="general")], [HashJudge()], Decoding(max_new_tokens=4, progress=False),
        at=["fit_end"], output_dir=str(tmp_path / "eval"),
    )  # fmt: skip
    module = PiggyModule(tiny_qwen, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = ChatSFTDataModule(
        write_jsonl(tmp_path / "t.jsonl", chat_rows(8)), tokenizer=tiny_qwen, transforms=[Inoculation(EVIL)],
        val_fraction=0.25, batch_size=4, cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[evaluate],
    )  # fmt: skip
    trainer.fit(module, data)
    assert all(EVIL in data.tokenizer.decode(e.input_ids) for e in data.train_set)
    records = [json.loads(line) for line in (tmp_path / "eval" / "fit_end" / "results.jsonl").open()]
    assert len(records) == 4
    for r in records:
        expected = data.tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True
        )
        assert r["prompt"] == expected and r["system"] is None and EVIL not in r["prompt"]
    assert not any(EVIL in data.tokenizer.decode(e.input_ids) for e in data.val_set)


# -- which prefix TReFT holds under inoculation ----------------------------------------------------------------
def _prefix_ids(tokenizer, system: str | None) -> list[int]:
    """The tokens before the user content of the template's render (with ``system`` or the default system block)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "QQQ"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text[: text.index("QQQ")], add_special_tokens=False)["input_ids"]


def _kv(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, T, D)`` outputs of every layer's ``k_proj`` and ``v_proj`` on ``ids`` alone (forward hooks)."""
    keys, values, hooks = [], [], []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o[0])))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o[0])))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    return torch.stack(keys), torch.stack(values)


def _drift(policy: tuple, reference: tuple) -> float:
    """``mean_l (mean_t ||k - k0||^2 / ||k0||^2 + the same for v)``, by hand."""
    per_layer = [
        ((p - r).pow(2).sum(-1) / r.pow(2).sum(-1)).mean(-1) for p, r in zip(policy, reference, strict=True)
    ]  # keys, values: (L,) each
    return float((per_layer[0] + per_layer[1]).mean())


def _inoculated_batch(model_dir, tmp_path, transforms) -> tuple[ChatSFTDataModule, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    dm = _module(data, model_dir, tmp_path, transforms, val_fraction=0.0)
    return dm, collate(dm.train_set, dm.tokenizer.pad_token_id)


def test_default_and_per_row_prefix_references_under_inoculation(tiny_qwen, tmp_path):
    """DefaultPrefixKVDrift holds the default (test-time) prefix, PerRowPrefixKVDrift the inoculated one: each
    penalty equals the relative drift between the policy and an independent forward of the initial model on that
    prefix's tokens alone."""
    default, own = DefaultPrefixKVDrift(name="default"), PerRowPrefixKVDrift(name="own")
    module = PiggyModule(tiny_qwen, regularizers=[default, own])  # full finetuning
    module.configure_model()
    dm, batch = _inoculated_batch(tiny_qwen, tmp_path, [Inoculation(EVIL)])
    initial = load_causal_lm(tiny_qwen)
    default_ids, inoculated_ids = _prefix_ids(dm.tokenizer, None), _prefix_ids(dm.tokenizer, EVIL)
    assert default_ids == list(module.spans.anatomy.prefix_ids) and default_ids != inoculated_ids
    assert (batch["input_ids"][:, : len(inoculated_ids)] == torch.tensor(inoculated_ids)).all()
    ref_default = _kv(initial, default_ids)
    torch.testing.assert_close(default.ref_keys, ref_default[0])  # cached once, from the default prefix
    torch.testing.assert_close(default.ref_values, ref_default[1])
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses = module._losses(batch)
    expected_default = _drift(_kv(module.policy, default_ids), ref_default)
    expected_own = _drift(_kv(module.policy, inoculated_ids), _kv(initial, inoculated_ids))
    assert losses["reg_raw/default"].item() == pytest.approx(expected_default, rel=1e-4)
    assert losses["reg_raw/own"].item() == pytest.approx(expected_own, rel=1e-4)
    assert abs(expected_default - expected_own) > 1e-3 * expected_own  # two different references


def test_prefix_kv_drift_refuses_inoculated_rows_and_equals_the_default_one_on_plain_rows(tiny_qwen, tmp_path):
    module = PiggyModule(tiny_qwen, regularizers=[PrefixKVDrift()])
    module.configure_model()
    _, inoculated = _inoculated_batch(tiny_qwen, tmp_path / "a", [Inoculation(EVIL)])
    with pytest.raises(ValueError, match="do not start with the template's default prefix"):
        module._losses(inoculated)
    # on rows that start with the default prefix, the separate forward gives PrefixKVDrift's penalty and gradients
    _, plain = _inoculated_batch(tiny_qwen, tmp_path / "b", [])
    grads = []
    for reg in (PrefixKVDrift(), DefaultPrefixKVDrift()):
        module = PiggyModule(tiny_qwen, regularizers=[reg])
        module.configure_model()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in module.policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        raw = module._losses(plain)["reg_raw/prefix_kv"]
        module.policy.zero_grad()
        reg(*_own_inputs(module, reg, plain)).backward()
        grads.append((raw, [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]))
    (raw_a, grad_a), (raw_b, grad_b) = grads
    torch.testing.assert_close(raw_a, raw_b)
    assert len(grad_a) == len(grad_b) > 0
    for a, b in zip(grad_a, grad_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _own_inputs(module, reg, batch):
    """``reg``'s batch and records of one step (the module's own forwards), for a backward of its penalty alone."""
    from piggy_lightning.losses import regularizer_inputs

    _, (given,) = regularizer_inputs(module.policy, module.reference, [reg], batch)
    return given.batch, given.policy, given.reference
