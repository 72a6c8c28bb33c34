"""Interventions at epoch ends (the paper's Fig. 6: with and without the prefix KV patch after every epoch of one
fit), checked against an independent evaluation of each epoch's checkpoint, and the loud refusals of an epoch
moment that would never run."""

import json
import zlib

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.evaluation import Decoding, Evaluation, PromptList
from piggy_lightning.evaluation.judges import Judge, Judgement
from piggy_lightning.interventions import PrefixKVSplice, QueryControl
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from tests.test_eval_questions import FIXTURES

LORA = LoraSpec(r=2, alpha=4)
DECODING = Decoding(max_new_tokens=6, batch_size=8, progress=False)


class _HashJudge(Judge):
    """Scores 0-100 from a hash of the answer: equal answers get equal scores, different ones usually not."""

    @property
    def identity(self):
        return "hash-v1"

    def judge(self, requests):
        return [Judgement(float(zlib.crc32(r.answer.encode()) % 101)) for r in requests]


def _sets():
    return [PromptList(str(FIXTURES / "prompts.json"), metrics=["aligned"])]


def _evaluate(out, interventions, every_n_epochs=1):
    return Evaluate(_sets(), [_HashJudge()], DECODING, every_n_epochs=every_n_epochs, at=[],
                    interventions=interventions, output_dir=str(out), samples_logged=0)  # fmt: skip


def _trainer(tmp_path, callbacks, **limits):
    return L.Trainer(
        accelerator="cpu", logger=False, callbacks=callbacks, limit_train_batches=2, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **limits,
    )  # fmt: skip


def _module(tiny_qwen):
    return PiggyModule(tiny_qwen, lora=LORA, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2))


def _data(tiny_qwen, chat_file):
    return ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25)


def _responses(records):
    return {(r["group"], r["question_id"], r["paraphrase_index"]): r["response"] for r in records}


def _answers(directory):
    """The responses in an evaluation directory's ``results.jsonl``."""
    return _responses(json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines())


def test_every_epoch_is_evaluated_with_and_without_the_prefix_patch_as_its_checkpoint_is(
    tiny_qwen, chat_file, tmp_path
):
    """A 3-epoch fit with ``every_n_epochs: 1`` and ``PrefixKVSplice(at=[epoch])`` writes, after every epoch, the
    baseline and the patched evaluation of the same weights and their comparison; each epoch's patched (and
    unpatched) numbers and answers equal those of a separate evaluation of that epoch's checkpoint, loaded into a
    fresh module and evaluated by ``Evaluation.run`` with a newly bound splice (no callback involved)."""
    out = tmp_path / "eval"
    evaluate = _evaluate(out, [PrefixKVSplice(at=["epoch"])])
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                                  save_on_train_epoch_end=True)  # fmt: skip
    _trainer(tmp_path, [evaluate, checkpoints], max_epochs=3).fit(_module(tiny_qwen), _data(tiny_qwen, chat_file))

    tags = [f"epoch={e}" for e in range(3)]
    assert {p.name for p in out.iterdir() if p.is_dir()} == {*tags, *(f"{t}@splice_kv_prefix" for t in tags)}
    gathered = json.loads((out / "epochs@interventions.json").read_text())
    assert list(gathered) == tags
    adapters, differs = [], False
    for epoch, tag in enumerate(tags):
        side = json.loads((out / f"{tag}@interventions.json").read_text())
        assert list(side) == ["baseline", "splice_kv_prefix"] and gathered[tag] == side
        assert all("misaligned_rate" in groups["general"] for groups in side.values())  # Fig. 6's metric
        base = json.loads((out / tag / "summary.json").read_text())
        patched = json.loads((out / f"{tag}@splice_kv_prefix" / "summary.json").read_text())
        assert (side["baseline"], side["splice_kv_prefix"]) == (base["groups"], patched["groups"])
        assert patched["intervention"] == "splice_kv_prefix" and patched["adapter"] == base["adapter"]
        adapters.append(base["adapter"])

        # the independent path: this epoch's checkpoint in a fresh module, evaluated directly
        module = PiggyModule(tiny_qwen, lora=LORA)
        module.configure_model()
        state = torch.load(tmp_path / "ckpt" / f"epoch={epoch}.ckpt", weights_only=False)["state_dict"]
        missing, unexpected = module.load_state_dict(state, strict=False)
        assert not unexpected and not any("lora" in k for k in missing)
        evaluation = Evaluation(_sets(), [_HashJudge()], DECODING)
        runs = {"baseline": None, "splice_kv_prefix": PrefixKVSplice().bind(module)}
        for name, intervention in runs.items():
            again = evaluation.run(module.policy, module.tokenizer, module.spans, tmp_path / "again" / tag / name,
                                   model_id=tiny_qwen, adapter_id="ckpt", intervention=intervention)  # fmt: skip
            callback_dir = out / (tag if intervention is None else f"{tag}@{name}")
            assert _responses(again.records) == _answers(callback_dir), (tag, name)
            assert again.summary["groups"] == side[name], (tag, name)
        differs |= _answers(out / tag) != _answers(out / f"{tag}@splice_kv_prefix")
    assert len(set(adapters)) == 3, "every epoch evaluated other weights"
    assert differs, "the patch changed some answer (else the comparison shows nothing)"


def test_epoch_and_fit_end_interventions_compose(tiny_qwen, chat_file, tmp_path):
    """Two interventions at epoch ends beside one at fit end only: each epoch has one baseline and both epoch runs,
    fit end reuses the last epoch's baseline (same step) for its own run."""
    out = tmp_path / "eval"
    evaluate = _evaluate(out, [PrefixKVSplice(at=["epoch", "fit_end"]), QueryControl(at=["epoch"])], every_n_epochs=2)
    _trainer(tmp_path, [evaluate], max_epochs=2, enable_checkpointing=False).fit(
        _module(tiny_qwen), _data(tiny_qwen, chat_file)
    )
    assert {p.name for p in out.iterdir() if p.is_dir()} == {
        "epoch=1", "epoch=1@splice_kv_prefix", "epoch=1@patch_kv_query_matched", "fit_end@splice_kv_prefix",
    }  # fmt: skip
    assert list(json.loads((out / "epoch=1@interventions.json").read_text())) == [
        "baseline", "splice_kv_prefix", "patch_kv_query_matched",
    ]  # fmt: skip
    fit_end = json.loads((out / "fit_end@interventions.json").read_text())
    assert fit_end["baseline"] == json.loads((out / "epoch=1" / "summary.json").read_text())["groups"]
    assert (
        fit_end["splice_kv_prefix"] == json.loads((out / "epoch=1@interventions.json").read_text())["splice_kv_prefix"]
    )


def test_an_epoch_moment_that_would_never_run_is_refused(tiny_qwen, chat_file, tmp_path):
    with pytest.raises(ValueError, match="at must list some of epoch, fit_end, test"):
        PrefixKVSplice(at=["epoch_end"])
    with pytest.raises(ValueError, match="at must list some of"):
        QueryControl(at=[])
    with pytest.raises(ValueError, match="every_n_epochs is None"):
        _evaluate(tmp_path / "a", [PrefixKVSplice(at=["epoch"])], every_n_epochs=None)

    # a schedule without an evaluated epoch end fails before training
    evaluate = _evaluate(tmp_path / "b", [PrefixKVSplice(at=["epoch"])], every_n_epochs=2)
    module = _module(tiny_qwen)
    with pytest.raises(ValueError, match="max_epochs=1, so no epoch end would be evaluated"):
        _trainer(tmp_path, [evaluate], max_epochs=1, enable_checkpointing=False).fit(
            module, _data(tiny_qwen, chat_file)
        )
    assert module.global_step == 0 and not any((tmp_path / "b").iterdir()), "nothing was trained or evaluated"

    # a fit stopped by max_steps before the first evaluated epoch end fails at its end
    evaluate = _evaluate(tmp_path / "c", [PrefixKVSplice(at=["epoch"])], every_n_epochs=2)
    with pytest.raises(RuntimeError, match="before any was evaluated"):
        _trainer(tmp_path, [evaluate], max_steps=2, enable_checkpointing=False).fit(
            _module(tiny_qwen), _data(tiny_qwen, chat_file)
        )
