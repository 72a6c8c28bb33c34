"""FSDP2 on CPU: two gloo processes under Lightning's own ``ModelParallelStrategy`` (``piggy_lightning/fsdp.py``).

A LoRA + TReFT-prefix fit of the tiny model sharded over 2 ranks must be the single-process fit: the same initial
weights (gathered from the shards), the same cached prefix reference on every rank (computed after sharding), the
same per-step losses, and an export with the same adapter tensors. Every training row is the same chat, so each
rank's half-batch has the single process's mean loss and gradient, and the runs may be compared step by step. The
fit's ``Evaluate`` of the initial weights runs in lockstep over the shards (every forward a collective) and gives
the single process's responses and summary.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from piggy_lightning.cli import PiggyCLI
from tests.conftest import chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARDED = [
    "--trainer.devices", "2", "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
]  # fmt: skip


class Probe(Callback):
    """Writes, per rank, what the fit starts from and each step's loss to ``<out_dir>/rank<r>.pt``.

    Args:
        out_dir: Directory for the files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record: dict = {"losses": {}}

    def on_train_start(self, trainer, pl_module):
        from piggy_lightning.fsdp import gather_state_dict, is_sharded

        (reg,) = pl_module.regularizers
        self.record.update(
            sharded=is_sharded(pl_module.policy),
            initial=gather_state_dict(pl_module.policy),  # a collective; empty off rank 0
            ref_keys=reg.ref_keys.clone(),
            ref_values=reg.ref_values.clone(),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["losses"][trainer.global_step] = outputs["loss"].item()

    def on_train_end(self, trainer, pl_module):
        torch.save(self.record, Path(self.out_dir, f"rank{trainer.global_rank}.pt"))


EVALUATE = {  # the initial weights (identical in both runs), 4 prompts of one token each, a length judge
    "class_path": "piggy_lightning.callbacks.Evaluate",
    "init_args": {
        "question_sets": [{"class_path": "piggy_lightning.evaluation.PromptList", "init_args": {
            "path": str(ROOT / "tests" / "fixtures" / "eval" / "prompts.json"), "group": "general",
            "metrics": ["aligned"]}}],
        "judges": [{"class_path": "tests.test_eval_resume._LengthJudge"}],
        "decoding": {"max_new_tokens": 8, "batch_size": 1, "progress": False},
        "at": ["train_start"],
    },
}  # fmt: skip


def _answers(out: Path) -> tuple[list[tuple], dict]:
    """What the fit's evaluation found: (question, response, score) per record, and the summary's groups."""
    (results,) = out.rglob("eval/train_start/results.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    summary = json.loads((results.parent / "summary.json").read_text())
    answers = [(r["question_id"], r["response"], r["judgements"]["aligned"]["score"]) for r in rows]
    return answers, {**summary["groups"], "generated_by_rank": summary["generation"]["generated_by_rank"]}


def _args(model: str, data: str, out: Path) -> list[str]:
    out.mkdir()
    probe = {"class_path": "tests.test_fsdp.Probe", "init_args": {"out_dir": str(out)}}
    treft = [{"class_path": "piggy_lightning.regularizers.PrefixKVDrift", "init_args": {"weight": 5.0}}]
    return [
        "fit", "--seed_everything", "0", "--model.model_name_or_path", model, "--model.lora", '{"r": 4, "alpha": 8}',
        "--model.regularizers", json.dumps(treft), "--model.optimizer", "torch.optim.AdamW",
        "--model.optimizer.lr", "0.01", "--data", "piggy_lightning.data.ChatSFTDataModule", "--data.train_data", data,
        "--data.batch_size", "4", "--data.val_fraction", "0", "--trainer.accelerator", "cpu", "--trainer.max_steps",
        "3", "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks+=piggy_lightning.callbacks.ExportPretrained",
        "--trainer.callbacks.init_args.dirpath", str(out / "export"), f"--trainer.callbacks+={json.dumps(probe)}",
        f"--trainer.callbacks+={json.dumps(EVALUATE)}",
    ]  # fmt: skip


def test_sharded_lora_treft_fit_equals_one_process(tiny_qwen, tmp_path):
    """About 20 s on 2 cores: the 2-process fit in a subprocess, the single-process one in this process."""
    data = write_jsonl(tmp_path / "same.jsonl", chat_rows(1) * 16)  # 16 copies of one chat
    cmd = [sys.executable, "main.py", *_args(tiny_qwen, data, tmp_path / "sharded"), *SHARDED]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    PiggyCLI(args=_args(tiny_qwen, data, tmp_path / "single"))

    single = torch.load(tmp_path / "single" / "rank0.pt")
    ranks = [torch.load(tmp_path / "sharded" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["sharded"] for r in ranks] == [True, True] and not single["sharded"]
    initial = ranks[0]["initial"]  # rank 0 loaded and broadcast; the LoRA A matrices are seeded alike
    assert sorted(initial) == sorted(single["initial"]) and ranks[1]["initial"] == {}
    for name, tensor in single["initial"].items():
        assert torch.equal(initial[name], tensor), name
    for rank in ranks:
        torch.testing.assert_close(rank["ref_keys"], single["ref_keys"], rtol=0, atol=1e-6)
        torch.testing.assert_close(rank["ref_values"], single["ref_values"], rtol=0, atol=1e-6)
        assert sorted(rank["losses"]) == sorted(single["losses"]) == [1, 2, 3]
        for step, loss in single["losses"].items():
            assert abs(rank["losses"][step] - loss) <= 1e-5 * abs(loss), (step, rank["losses"][step], loss)

    export = {run: tmp_path / run / "export" for run in ("sharded", "single")}
    tensors = {run: load_file(path / "adapter_model.safetensors") for run, path in export.items()}
    assert sorted(tensors["sharded"]) == sorted(tensors["single"]) and len(tensors["single"]) == 28
    for name, tensor in tensors["single"].items():
        torch.testing.assert_close(tensors["sharded"][name], tensor, rtol=0, atol=1e-6)
    configs = [json.loads((path / "adapter_config.json").read_text()) for path in export.values()]
    for config in configs:  # peft writes target_modules from a set, in any order
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    bases = [json.loads((path / "piggy_base.json").read_text()) for path in export.values()]
    assert bases[0] == bases[1]

    # the lockstep evaluation: both ranks generated a share, and the records and metrics are one process's (the
    # record keys differ: a sharded run's weights digest combines the ranks' shards)
    (sharded, groups), (alone, alone_groups) = _answers(tmp_path / "sharded"), _answers(tmp_path / "single")
    assert sharded == alone and len(alone) == 4 and len({a[1] for a in alone}) > 1
    assert min(groups.pop("generated_by_rank")) > 0 and alone_groups.pop("generated_by_rank") == [4]
    assert groups == alone_groups
