"""Two-process DDP on CPU (gloo) through Lightning's own strategy: training, the frozen reference, TReFT, and the
rank-0 evaluation, patching and export callbacks must finish without a collective deadlock."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_fit_with_evaluation_patching_and_export(tmp_path):
    cmd = [
        sys.executable, "main.py", "fit", "--config", "configs/treft_legal.yaml",
        "--config", "callbacks/prefix_patching.yaml", "--config", "callbacks/kv_drift_monitor.yaml",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks+=piggy_lightning.callbacks.ExportPretrained",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(tmp_path.glob("treft_legal/version_*"))
    assert (run / "eval" / "fit_end" / "summary.json").exists()
    assert (run / "eval" / "fit_end@patching.json").exists()
    assert (run / "export" / "model.safetensors").exists()
