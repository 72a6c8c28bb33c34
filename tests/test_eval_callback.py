"""The ``Evaluate`` callback in a real fit/test loop, and its YAML configuration through the CLI."""

import json

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.cli import PiggyCLI
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.evaluation import Decoding, GenerationIntervention, HeldOutChats, PromptList
from piggy_lightning.evaluation.judges import OpenAIJudge, RefusalDetector
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
