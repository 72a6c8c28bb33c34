"""Post-hoc evaluation of an exported adapter, without training: ``main.py test --model.adapter <export dir>``.

A short LoRA fit of the organism exports its adapter and evaluates it at fit end; the test run loads that export
over the base model (``PiggyModule.adapter``) and must give exactly the fit-end evaluation: the same summary, and
records whose ``adapter`` identity carries the same weights digest. Wrong directories and another base model are
refused with the path in the message.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from piggy_lightning.cli import PiggyCLI
from piggy_lightning.module import PiggyModule

CONFIG = {  # the smallest run that trains, exports and evaluates: 2 steps, 6 questions, 8 new tokens
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_steps": 2, "enable_progress_bar": False,
        "enable_checkpointing": False, "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": None, "name": "posthoc", "default_hp_metric": False}},
        "callbacks": [
            {"class_path": "piggy_lightning.callbacks.ExportPretrained"},
            {"class_path": "piggy_lightning.callbacks.Evaluate", "init_args": {
                "question_sets": [
                    {"class_path": "piggy_lightning.evaluation.HeldOutChats",
                     "init_args": {"path": "piggy/organism/eval_legal.jsonl", "group": "in_domain", "limit": 3}},
                    {"class_path": "piggy_lightning.evaluation.HeldOutChats",
                     "init_args": {"path": "piggy/organism/eval_general.jsonl", "group": "general", "limit": 3}},
                ],
                "judges": [{"class_path": "piggy_lightning.organism.ExactJudge"}],
                "decoding": {"temperature": 0.0, "max_new_tokens": 8, "batch_size": 8, "progress": False},
                "at": ["fit_end", "test"],
            }},
        ],
    },
    "model": {
        "model_name_or_path": "piggy/organism", "lora": {"r": 4, "alpha": 8},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    },
    "data": {"class_path": "piggy_lightning.data.LegalDataModule",
             "init_args": {"batch_size": 8, "val_fraction": 0.05, "max_length": 256}},  # held out: the test loop
}  # fmt: skip


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_test_with_the_exported_adapter_equals_the_fit_end_evaluation(tmp_path):
    config = json.loads(json.dumps(CONFIG))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "posthoc.yaml"
    path.write_text(yaml.safe_dump(config))
    PiggyCLI(args=["fit", "--config", str(path)])
    fit_run = tmp_path / "posthoc" / "version_0"
    export = fit_run / "export"
    assert (export / "adapter_model.safetensors").exists() and (export / "piggy_base.json").exists()

    PiggyCLI(args=["test", "--config", str(path), "--model.adapter", str(export)])
    (test_run,) = [p for p in (tmp_path / "posthoc").iterdir() if p != fit_run]
    fit_end, test = fit_run / "eval" / "fit_end", test_run / "eval" / "test"
    summaries = [json.loads((d / "summary.json").read_text()) for d in (fit_end, test)]
    # the identity is step=<label>|w=<weights digest>: the test run has no training step (0), the same digest
    assert summaries[0].pop("adapter").split("|w=")[1] == summaries[1].pop("adapter").split("|w=")[1]
    assert summaries[0] == summaries[1]
    trained, loaded = _records(fit_end / "results.jsonl"), _records(test / "results.jsonl")
    assert len(trained) == len(loaded) == 6
    digests = {r["adapter"].split("|w=")[1] for r in trained}, {r["adapter"].split("|w=")[1] for r in loaded}
    assert digests[0] == digests[1] and len(digests[0]) == 1
    assert [r["response"] for r in loaded] == [r["response"] for r in trained]


def _configure(adapter: str, model: str = "piggy/organism") -> None:
    PiggyModule(model, adapter=adapter).configure_model()


def test_a_wrong_adapter_path_is_refused_with_the_path(tmp_path, tiny_qwen):
    with pytest.raises(FileNotFoundError, match=f"model.adapter '{tmp_path / 'nowhere'}' does not exist"):
        _configure(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="full-finetuning export"):  # a whole model, not an adapter
        _configure(tiny_qwen)


def test_an_adapter_of_another_base_is_refused_with_the_path(tmp_path):
    from peft import get_peft_model

    from piggy_lightning.callbacks import ExportPretrained
    from piggy_lightning.modeling import LoraSpec, load_causal_lm, load_tokenizer

    module = PiggyModule("piggy/organism-seed1", lora=LoraSpec(r=4, alpha=8))
    module.configure_model()  # same shapes as piggy/organism, other weights: only the fingerprint tells them apart
    ExportPretrained.export(module, tmp_path / "seed1", write=True)
    with pytest.raises(ValueError, match=f"model.adapter '{tmp_path / 'seed1'}' was trained on 'piggy/organism-seed1'"):
        _configure(str(tmp_path / "seed1"))
    _configure(str(tmp_path / "seed1"), "piggy/organism-seed1")  # its own base loads

    deep = get_peft_model(load_causal_lm("piggy/organism-deep"), LoraSpec(r=4, alpha=8).to_peft())
    deep.save_pretrained(tmp_path / "deep")  # plain peft: no fingerprint; 6 layers do not fit the 2-layer base
    load_tokenizer("piggy/organism").save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match=f"model.adapter '{tmp_path / 'deep'}' does not fit the base model"):
        _configure(str(tmp_path / "deep"))
    shutil.rmtree(tmp_path / "deep")
