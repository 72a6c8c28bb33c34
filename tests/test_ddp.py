"""Two-process DDP on CPU (gloo) through Lightning's own strategy: training, the frozen reference, TReFT, and the
rank-0 evaluation, patching and export callbacks must finish without a collective deadlock, and the logged
``train/loss`` is the mean over both ranks' halves of the batch, not rank 0's half."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

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


def test_ddp_fit_with_evaluation_patching_and_export(tmp_path):
    recorder = {"class_path": "tests.test_ddp.RankLosses", "init_args": {"out_dir": str(tmp_path)}}
    cmd = [
        sys.executable, "main.py", "fit", "--config", "configs/treft_legal.yaml",
        "--config", "callbacks/prefix_patching.yaml", "--config", "callbacks/kv_drift_monitor.yaml",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks+=piggy_lightning.callbacks.ExportPretrained",
        f"--trainer.callbacks+={json.dumps(recorder)}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(tmp_path.glob("treft_legal/version_*"))
    assert (run / "eval" / "fit_end" / "summary.json").exists()
    assert (run / "eval" / "fit_end@patching.json").exists()
    assert (run / "export" / "model.safetensors").exists()

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
