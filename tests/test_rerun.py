"""Rerunning the same ``main.py fit`` command continues the run: same directory, its ``last.ckpt``, its evaluation.

The command is the main job for one epoch (17 steps). The first run is killed during the fit-end evaluation, after
two batches of its 480 answers; the epoch-end checkpoint (``last.ckpt``, step 17) is on disk. Rerunning it used to start
from scratch in ``version_1``; now it resumes in ``version_0`` without a training step and generates only the
missing answers; a third run generates and judges nothing. Another config gets a new directory, and a fixed
directory holding another config is refused instead of overwritten.
"""

import json
from pathlib import Path

import pytest
import torch

from piggy_lightning.cli import PiggyCLI
from piggy_lightning.evaluation.results import ResponseLog
from piggy_lightning.module import PiggyModule

ROOT = Path(__file__).resolve().parents[1]
KILLED_AFTER_BATCHES = 2  # of the fit-end evaluation's generation batches
N_ANSWERS = 96 + 96 + 96 + 96 + 96  # legal, medical, finance, auto, general


class _Killed(Exception):
    pass


def _command(save_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "treft_legal.yaml"), "--trainer.max_epochs", "1",
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


def _count(monkeypatch) -> dict[str, int]:
    """Counts training steps and answers written from now on."""
    counts = {"steps": 0, "answers": 0}
    step, extend = PiggyModule.training_step, ResponseLog.extend

    def counting_step(self, batch, batch_idx):
        counts["steps"] += 1
        return step(self, batch, batch_idx)

    def counting_extend(self, records):
        counts["answers"] += len(records)
        return extend(self, records)

    monkeypatch.setattr(PiggyModule, "training_step", counting_step)
    monkeypatch.setattr(ResponseLog, "extend", counting_extend)
    return counts


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rerunning_a_killed_fit_resumes_its_checkpoint_and_evaluation(tmp_path, monkeypatch):
    command = _command(tmp_path)
    run = tmp_path / "treft_legal" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    extend, batches = ResponseLog.extend, []

    def dying_extend(self, records):  # killed in the middle of the fit-end evaluation, after its 2nd batch
        extend(self, records)
        batches.append(len(records))
        if len(batches) == KILLED_AFTER_BATCHES:
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(ResponseLog, "extend", dying_extend)
        with pytest.raises(_Killed):
            PiggyCLI(args=command)
    assert torch.load(last, weights_only=False)["global_step"] == 17
    done = len(_lines(run / "eval" / "fit_end" / "responses.jsonl"))
    assert done == sum(batches) and 0 < done < N_ANSWERS
    assert not (run / "eval" / "fit_end" / "results.jsonl").exists()

    with monkeypatch.context() as m:
        counts = _count(m)
        cli = PiggyCLI(args=command)  # the same command
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert Path(cli.trainer.log_dir) == run and cli.continued_run == run
    assert Path(cli.trainer.ckpt_path) == last and cli.trainer.global_step == 17
    assert counts == {"steps": 0, "answers": N_ANSWERS - done}
    results = _lines(run / "eval" / "fit_end" / "results.jsonl")
    assert len(results) == N_ANSWERS == len({r["key"] for r in _lines(run / "eval" / "fit_end" / "responses.jsonl")})

    with monkeypatch.context() as m:
        counts = _count(m)
        PiggyCLI(args=command)
    assert counts == {"steps": 0, "answers": 0}
    summary = json.loads((run / "eval" / "fit_end" / "summary.json").read_text())
    assert summary["judge_cache"]["misses"] == 0 and summary["judge_cache"]["hits"] > 0
    assert _lines(run / "eval" / "fit_end" / "results.jsonl") == results
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_another_config_gets_a_new_directory_and_a_fixed_one_is_not_overwritten(tmp_path, monkeypatch):
    run = tmp_path / "treft_legal" / "version_0"
    run.mkdir(parents=True)
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    same = PiggyCLI(run=False, args=_command(tmp_path)[1:])
    (run / "config.yaml").write_text(same.parser.dump(same.config))

    again = PiggyCLI(run=False, args=_command(tmp_path)[1:])  # ckpt_path and the logger version do not count
    assert again.trainer.logger.version == 0 and again.continued_run == run
    other = _command(tmp_path, "--model.optimizer.init_args.lr", "0.0002")[1:]
    cli = PiggyCLI(run=False, args=other)
    assert cli.trainer.logger.version == 1 and cli.continued_run is None

    fixed = PiggyCLI(run=False, args=[*other, "--trainer.logger.init_args.version", "0"])
    before = (run / "config.yaml").read_text()
    with pytest.raises(RuntimeError, match=r"version_0 holds a run with another config .*model\.optimizer"):
        fixed.trainer.fit(fixed.model, fixed.datamodule)
    assert (run / "config.yaml").read_text() == before
