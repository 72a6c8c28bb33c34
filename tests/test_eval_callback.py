"""The ``Evaluate`` callback in a real fit/test loop, its YAML configuration (interventions included) through the
CLI, the global RNG it leaves alone and the directory it follows."""

import json

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.cli import PiggyCLI
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.evaluation import Decoding, GenerationIntervention, HeldOutChats, PromptList
from piggy_lightning.evaluation.judges import OpenAIJudge, RefusalDetector
from piggy_lightning.interventions import Perturb, PrefixKVSplice, UniformTokens
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from tests.test_eval_questions import FIXTURES
from tests.test_eval_resume import _LengthJudge


class _Named(GenerationIntervention):
    name = "named"


def test_evaluate_during_fit_and_test_logs_and_writes_files(tiny_qwen, chat_file, tmp_path):
    sets = [
        PromptList(str(FIXTURES / "prompts.json"), metrics=["aligned", "coherent", "refusal"]),
        HeldOutChats(str(FIXTURES / "held_out.jsonl"), metrics=["aligned"]),
    ]
    callback = Evaluate(
        sets, [RefusalDetector(), _LengthJudge()], Decoding(max_new_tokens=4, batch_size=8, progress=False),
        every_n_epochs=1, at=["train_start", "fit_end", "test"],
    )  # fmt: skip
    module = PiggyModule(tiny_qwen, lora=LoraSpec(r=2, alpha=4), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25)
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=logger,
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    root = tmp_path / "run" / "version_0" / "eval"
    # fit_end is skipped: the last epoch was evaluated at the same step
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch=0", "epoch=1", "train_start"]
    summary = json.loads((root / "epoch=1" / "summary.json").read_text())
    assert set(summary["groups"]) == {"general", "in_domain"} and "em_f1" in summary
    assert summary["adapter"].startswith("step=4|w=") and summary["model"] == tiny_qwen
    assert "refusal_rate" in summary["groups"]["general"]
    results = [json.loads(x) for x in (root / "epoch=1" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 4 + 3 and set(results[0]["judgements"]) == {"aligned", "coherent", "refusal"}
    assert module.policy.training  # evaluation restored train mode

    report = callback.evaluate(trainer, module, "manual", intervention=_Named())
    assert report.out_dir.name == "manual@named" and report.summary["intervention"] == "named"

    metrics = trainer.test(module, data, verbose=False)[0]
    assert "eval/general/alignment" in metrics and "eval/em_f1" in metrics
    assert (root / "test" / "summary.json").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root.parent), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"eval/general/alignment", "eval/in_domain/alignment", "eval/em_f1", "eval@named/em_f1"} <= set(
        acc.Tags()["scalars"]
    )
    assert "eval/samples/general/text_summary" in acc.Tags()["tensors"]


def test_evaluate_is_configured_by_class_path(tmp_path, chat_file, monkeypatch):
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"""
trainer:
  logger: false
  callbacks:
    - class_path: piggy_lightning.callbacks.evaluation.Evaluate
      init_args:
        question_sets:
          - class_path: piggy_lightning.evaluation.BetleyQuestions
            init_args: {{path: {FIXTURES / "questions.yaml"}, samples_per_paraphrase: 2}}
          - class_path: piggy_lightning.evaluation.HeldOutChats
            init_args: {{path: {FIXTURES / "held_out.jsonl"}, group: in_domain, limit: 2}}
        judges:
          - class_path: piggy_lightning.evaluation.judges.OpenAIJudge
            init_args: {{model: gpt-5-nano, mode: text, temperature: null, api_key_env: MY_JUDGE_KEY}}
        decoding: {{temperature: 1.0, max_new_tokens: 64, batch_size: 8}}
        every_n_epochs: 2
        at: [fit_end, test]
interventions:
  - class_path: piggy_lightning.interventions.PrefixKVSplice
    init_args: {{layers: [0], at: [fit_end, test]}}
  - class_path: piggy_lightning.interventions.Perturb
    init_args:
      segment: query
      replacer: {{class_path: piggy_lightning.interventions.UniformTokens}}
      trials: 2
"""
    )
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    args = ["--config", str(config), "--data", "piggy_lightning.data.ChatSFTDataModule", "--data.train_data", chat_file]
    cli = PiggyCLI(args=args, run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, Evaluate)]
    assert [type(s).__name__ for s in callback.question_sets] == ["BetleyQuestions", "HeldOutChats"]
    (judge,) = callback.judges
    assert isinstance(judge, OpenAIJudge) and judge.api_key_env == "MY_JUDGE_KEY" and judge.temperature is None
    assert callback.decoding == Decoding(temperature=1.0, max_new_tokens=64, batch_size=8)
    assert callback.every_n_epochs == 2 and callback.at == {"fit_end", "test"}
    splice, perturb = callback.interventions
    assert isinstance(splice, PrefixKVSplice) and splice.layers == [0] and splice.at == {"fit_end", "test"}
    assert isinstance(perturb, Perturb) and isinstance(perturb.replacer, UniformTokens) and perturb.at == {"test"}
    assert (perturb.name, perturb.trials) == ("perturb_query_uniform", 2) and callback.needs_reference


def _fit_with_dropout(tiny_qwen, chat_file, tmp_path, callbacks):
    torch.manual_seed(0)
    module = PiggyModule(
        tiny_qwen, lora=LoraSpec(r=2, alpha=4, dropout=0.5), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)
    )
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
        callbacks=callbacks, default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}


def test_a_sampled_evaluation_mid_fit_leaves_training_randomness_alone(tiny_qwen, chat_file, tmp_path, monkeypatch):
    """LoRA dropout draws from the global RNG: the weights after two epochs are the same with and without a
    sampled evaluation after the first epoch, and the global RNG state after an evaluation equals the one before."""
    sets = [PromptList(str(FIXTURES / "prompts.json"), metrics=["aligned"])]
    decoding = Decoding(temperature=1.0, samples=2, max_new_tokens=4, batch_size=8, progress=False)
    evaluate = Evaluate(sets, [_LengthJudge()], decoding, every_n_epochs=1, at=[], output_dir=str(tmp_path / "e"))
    states = []
    real = Evaluate.evaluate

    def watched(self, *args, **kwargs):
        before = torch.get_rng_state()
        report = real(self, *args, **kwargs)
        states.append(torch.equal(before, torch.get_rng_state()))
        return report

    monkeypatch.setattr(Evaluate, "evaluate", watched)
    with_eval = _fit_with_dropout(tiny_qwen, chat_file, tmp_path / "a", [evaluate])
    without = _fit_with_dropout(tiny_qwen, chat_file, tmp_path / "b", [])
    assert states == [True, True]  # after epochs 0 and 1
    assert with_eval.keys() == without.keys()
    assert all(torch.equal(with_eval[n], without[n]) for n in without)


def test_evaluation_files_follow_each_trainer(tiny_qwen, chat_file, tmp_path):
    """The evaluation root is resolved in every setup: one callback used by two trainers (here a test after another
    test with another logger) writes under each trainer's own log directory."""
    sets = [PromptList(str(FIXTURES / "prompts.json"), metrics=["aligned"])]
    callback = Evaluate(sets, [_LengthJudge()], Decoding(max_new_tokens=2, batch_size=8, progress=False), at=["test"])
    module = PiggyModule(tiny_qwen, lora=LoraSpec(r=2, alpha=4))
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25)
    for name in ("first", "second"):
        trainer = L.Trainer(
            accelerator="cpu", logger=TensorBoardLogger(tmp_path, name=name), callbacks=[callback], max_epochs=1,
            limit_test_batches=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )  # fmt: skip
        trainer.test(module, data, verbose=False)
        assert callback.out_dir == tmp_path / name / "version_0" / "eval"
        assert (callback.out_dir / "test" / "summary.json").exists()


def test_the_backend_is_chosen_by_class_path_and_defaults_to_hf(tmp_path, chat_file, monkeypatch):
    """One config block chooses where responses are generated; without it the in-process HF backend is used."""
    from piggy_lightning.evaluation.backends import CompletionsServer, HFBackend, RuntimeLoRA

    config = tmp_path / "eval.yaml"
    block = f"""
trainer:
  logger: false
  callbacks:
    - class_path: piggy_lightning.callbacks.Evaluate
      init_args:
        question_sets:
          - class_path: piggy_lightning.evaluation.HeldOutChats
            init_args: {{path: {FIXTURES / "held_out.jsonl"}, group: in_domain, limit: 2}}
        judges: [{{class_path: piggy_lightning.organism.ExactJudge}}]
"""
    server = """        backend:
          class_path: piggy_lightning.evaluation.backends.CompletionsServer
          init_args: {base_url: "http://10.0.0.7:8000/v1", model: served-name, lora: {}, concurrency: 4}
"""
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    args = ["--config", str(config), "--data", "piggy_lightning.data.ChatSFTDataModule", "--data.train_data", chat_file]
    backends = []
    for text in (block, block + server):
        config.write_text(text)
        (callback,) = [c for c in PiggyCLI(args=args, run=False).trainer.callbacks if isinstance(c, Evaluate)]
        backends.append(callback.backend)
    assert type(backends[0]) is HFBackend
    remote = backends[1]
    assert isinstance(remote, CompletionsServer) and remote.base_url == "http://10.0.0.7:8000/v1"
    assert remote.model == "served-name" and remote.concurrency == 4 and isinstance(remote.lora, RuntimeLoRA)
