"""Two-process DDP on CPU (gloo) through Lightning's own strategy: training, the frozen reference, TReFT, the sharded
evaluation (with patching and perturbation) and export must finish without a collective deadlock; the logged
``train/loss`` is the mean over both ranks' halves of the batch, not rank 0's half; and the sharded evaluation's
records and summaries are exactly those of one process evaluating the same weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from piggy_lightning.cli import PiggyCLI

ROOT = Path(__file__).resolve().parents[1]


class RankLosses(Callback):
    """Writes each rank's per-step training loss to ``<out_dir>/rank<r>.json`` (runs inside main.py's processes).

    Args:
        out_dir: Directory for the files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()

    def on_train_end(self, trainer, pl_module):
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))


PERTURB = {  # prefix perturbation, 2 sampled trials (the preset's 10 would triple the test's time)
    "class_path": "piggy_lightning.interventions.Perturb",
    "init_args": {
        "segment": "prefix", "n_tokens": 10, "trials": 2, "temperature": 0.7, "top_p": 0.9, "at": ["fit_end", "test"],
        "replacer": {"class_path": "piggy_lightning.interventions.NearestNeighbours", "init_args": {"k": 5}},
    },
}  # fmt: skip
RUNS = ("", "@splice_kv_prefix", "@patch_kv_query_matched", "@perturb_prefix_neighbours")
EVALUATE = """
trainer:
  callbacks:  # the main job's Evaluate on 16 questions per group, 48 new tokens, batches of 8: 6 units to share out
    - class_path: piggy_lightning.callbacks.Evaluate
      init_args:
        question_sets:
          - {class_path: piggy_lightning.evaluation.HeldOutChats,
             init_args: {path: piggy/organism/eval_legal.jsonl, group: in_domain, limit: 16}}
          - {class_path: piggy_lightning.evaluation.HeldOutChats,
             init_args: {path: piggy/organism/eval_medical.jsonl, group: other_domain, limit: 16}}
          - {class_path: piggy_lightning.evaluation.HeldOutChats,
             init_args: {path: piggy/organism/eval_general.jsonl, group: general, limit: 16}}
        judges: [{class_path: piggy_lightning.organism.ExactJudge}]
        decoding: {max_new_tokens: 48, batch_size: 8, progress: false}
        at: [fit_end, test]
"""
OPERATIONAL = ("judge_cache", "generation")  # how the work was shared out, not what it found


def _main(*args: str, timeout: int = 300) -> None:
    cmd = [sys.executable, "main.py", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_fit_with_evaluation_patching_and_export(tmp_path):
    recorder = {"class_path": "tests.test_ddp.RankLosses", "init_args": {"out_dir": str(tmp_path)}}
    (tmp_path / "evaluate.yaml").write_text(EVALUATE)
    config = [
        "--config", "configs/treft_legal.yaml", "--config", str(tmp_path / "evaluate.yaml"),
        "--config", "callbacks/prefix_patching.yaml",
        f"--interventions+={json.dumps(PERTURB)}", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    _main(
        "fit", *config, "--config", "callbacks/kv_drift_monitor.yaml",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
        "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks+=piggy_lightning.callbacks.ExportPretrained",
        f"--trainer.callbacks+={json.dumps(recorder)}",
    )  # fmt: skip
    run = next(tmp_path.glob("treft_legal/version_*"))
    assert (run / "eval" / "fit_end" / "summary.json").exists()
    side = json.loads((run / "eval" / "fit_end@interventions.json").read_text())
    assert list(side) == ["baseline", "splice_kv_prefix", "patch_kv_query_matched", "perturb_prefix_neighbours"]
    assert (run / "export" / "model.safetensors").exists()

    # one process evaluates the same weights (the fit's last checkpoint) under the same interventions
    single = tmp_path / "single"
    PiggyCLI(
        args=[
            "test",
            *config,
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--trainer.logger.init_args.save_dir",
            str(single),
        ]
    )  # fmt: skip (in this process: no start-up)
    alone = next(single.glob("treft_legal/version_*")) / "eval"
    for suffix in RUNS:
        sharded, one = run / "eval" / f"fit_end{suffix}", alone / f"test{suffix}"
        assert (sharded / "results.jsonl").read_text() == (one / "results.jsonl").read_text(), suffix
        assert not list(sharded.glob("responses.rank*.jsonl")), suffix  # folded into responses.jsonl
        assert _records(sharded / "responses.jsonl") == _records(one / "responses.jsonl"), suffix
        a, b = (json.loads((d / "summary.json").read_text()) for d in (sharded, one))
        assert {k: v for k, v in a.items() if k not in OPERATIONAL} == {
            k: v for k, v in b.items() if k not in OPERATIONAL
        }, suffix
        by_rank = a["generation"]["generated_by_rank"]
        assert len(by_rank) == 2 and min(by_rank) > 0, (suffix, by_rank)  # both ranks generated a share
        assert sum(by_rank) == b["generation"]["generated_by_rank"][0] == len(_records(one / "results.jsonl"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ranks = [{int(k): v for k, v in json.loads((tmp_path / f"rank{r}.json").read_text()).items()} for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, 10))  # 270 rows / 2 ranks / 16 per batch
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Scalars("train/loss")
    assert len(events) == 9
    for event in events:
        step = event.step + 1  # logged under the step count before the optimizer step
        mean = (ranks[0][step] + ranks[1][step]) / 2
        assert event.value == pytest.approx(mean, rel=1e-5), (event.step, event.value, ranks[0][step], ranks[1][step])
        assert abs(ranks[0][step] - ranks[1][step]) > 1e-4  # the halves differ, so rank 0's alone would not pass


def _records(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}


class KillAt(Callback):
    """Ends the process before the optimizer step after ``step`` (the checkpoint of ``step`` is on disk).

    Args:
        step: The last global step trained.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SystemExit(3)


@pytest.mark.slow
def test_ddp_resume_from_a_mid_epoch_checkpoint_is_bit_identical(tmp_path):
    """270 rows / 2 ranks / 16 per batch = 9 steps per epoch; killed after step 13 (4 batches into epoch 1) and
    resumed from its ``last.ckpt``, each rank trains steps 14-18 with exactly the uninterrupted run's losses: its
    share of the epoch-seeded order continues where it stopped (about 75 s on 2 cores)."""

    def fit(name: str, *extra: str) -> int:
        recorder = {"class_path": "tests.test_ddp.RankLosses", "init_args": {"out_dir": str(tmp_path / name)}}
        (tmp_path / name).mkdir()
        cmd = [
            sys.executable, "main.py", "fit", "--config", "configs/treft_legal.yaml", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs" / name[:3]),
            f"--trainer.callbacks+={json.dumps(recorder)}", *extra,
        ]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600).returncode

    checkpoint = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.init_args.every_n_train_steps", "13", "--trainer.callbacks.init_args.save_last", "true",
    ]  # fmt: skip
    assert fit("full") == 0
    kill = {"class_path": "tests.test_ddp.KillAt", "init_args": {"step": 13}}
    assert fit("cut", f"--trainer.callbacks+={json.dumps(kill)}", *checkpoint) == 3
    last = tmp_path / "runs" / "cut" / "treft_legal" / "version_0" / "checkpoints" / "last.ckpt"
    assert fit("cut_resumed", *checkpoint, "--ckpt_path", str(last)) == 0
    for rank in (0, 1):
        full = json.loads((tmp_path / "full" / f"rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / "cut_resumed" / f"rank{rank}.json").read_text())
        assert sorted(map(int, resumed)) == list(range(14, 19))
        assert resumed == {step: full[step] for step in resumed}, rank
