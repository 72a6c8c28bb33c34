"""The command line: help and print_config are instant, and a tiny fit writes TensorBoard events and config.yaml."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from piggy_lightning.cli import PiggyCLI
from piggy_lightning.module import PiggyModule

ROOT = Path(__file__).resolve().parents[1]


def test_print_config_loads_no_weights(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: calls.append(1))
    with pytest.raises(SystemExit):
        PiggyCLI(args=["fit", "--data", "piggy_lightning.data.LegalDataModule", "--print_config"])
    out = capsys.readouterr().out
    assert "model_name_or_path: piggy/organism" in out and "train_data:" in out
    assert not calls


def test_help_documents_arguments(capsys):
    with pytest.raises(SystemExit):
        PiggyCLI(args=["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.lora LORA LoRA settings; None means full finetuning" in out
    assert "A transformers model id or directory, or ``piggy/organism`` for the embedded default" in out


def test_main_fit_on_tiny_model_writes_events_and_config(tiny_qwen, chat_file, tmp_path):
    start = time.perf_counter()
    cmd = [
        sys.executable, "main.py", "fit", "--model.model_name_or_path", tiny_qwen,
        "--data", "piggy_lightning.data.ChatSFTDataModule", "--data.train_data", chat_file,
        "--config", "configs/debug.yaml",
        "--data.batch_size", "4", "--trainer.fast_dev_run", "false", "--trainer.max_steps", "3",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_checkpointing", "false",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "TensorBoard events were not written"
    assert list(tmp_path.rglob("config.yaml")), "SaveConfigCallback did not write config.yaml"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/device/items_per_sec"} <= tags, tags  # the CLI's ThroughputMonitor
    assert any(t.startswith("lr-") for t in tags), tags
    # items are non-padding tokens: 3 steps of 4 rows, a rate from step 2 on (a window of 2 batches)
    assert [e.value for e in acc.Scalars("train/samples")][-1] == 12
    rates = acc.Scalars("train/device/items_per_sec")
    assert [e.step for e in rates] == [1, 2] and all(e.value > 0 for e in rates)
    assert time.perf_counter() - start < 120


def test_debug_overlay_keeps_evaluation_files_in_a_run_directory(tmp_path, monkeypatch):
    """fast_dev_run drops the logger; evaluation used to write ``<cwd>/eval/`` (the repository root)."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "treft_legal.yaml"), "--config", str(ROOT / "configs" / "debug.yaml")]
    cli = PiggyCLI(run=False, args=args)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert not (tmp_path / "eval").exists()
    assert (tmp_path / "runs" / "debug" / "eval" / "fit_end" / "summary.json").exists()


def test_postfix_exclude_is_linked_from_model_to_data(monkeypatch):
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    think = "<think>\n\n</think>\n\n"
    args = ["--config", str(ROOT / "configs" / "treft_legal.yaml"), "--model.postfix_exclude", think]
    cli = PiggyCLI(run=False, args=args)
    assert cli.model.postfix_exclude == think and cli.datamodule.hparams.postfix_exclude == think


def test_attribute_docstrings_are_parsed_only_for_help_and_print_config(monkeypatch):
    """They cost about 0.6 s per start and only --help / --print_config show them."""
    from jsonargparse._optionals import get_docstring_parse_options

    from piggy_lightning.cli import _wants_docs

    assert _wants_docs(["fit", "--help"]) and _wants_docs(["fit", "--print_config=comments"]) and _wants_docs({})
    assert not _wants_docs(["fit", "--config", "configs/treft_legal.yaml"])
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    PiggyCLI(run=False, args=["--config", str(ROOT / "configs" / "treft_legal.yaml"), "--trainer.logger", "false"])
    assert get_docstring_parse_options()["attribute_docstrings"] is False
    with pytest.raises(SystemExit):
        PiggyCLI(args=["fit", "--data", "piggy_lightning.data.LegalDataModule", "--print_config"])
    assert get_docstring_parse_options()["attribute_docstrings"] is True


def test_openmp_wait_policy_is_passive_only_on_a_busy_machine_and_a_set_one_is_kept():
    import multiprocessing

    from piggy_lightning import busy_cores, wait_policy

    assert wait_policy(1.0) == "PASSIVE" and wait_policy(0.1) is None
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.3) >= 0.5, "a busy-looping process keeps about one core busy"
    finally:
        burner.kill()
        burner.wait()
    assert 0.0 <= busy_cores(0.05) <= multiprocessing.cpu_count()
    code = "import os, piggy_lightning; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {**__import__("os").environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip() == "ACTIVE"


def test_interventions_without_an_evaluate_callback_are_refused(tmp_path):
    """Top-level interventions reach Evaluate callbacks only; with none, they would silently do nothing."""
    import pytest

    from piggy_lightning.cli import PiggyCLI

    root = Path(__file__).resolve().parents[1]
    args = [
        "--config", str(root / "configs" / "treft_legal.yaml"),
        "--trainer.callbacks", "[]",
        "--config", str(root / "callbacks" / "prefix_patching.yaml"),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    refused = r"interventions \['PrefixKVSplice', 'QueryControl'\] are configured but no Evaluate"
    with pytest.raises(ValueError, match=refused):
        PiggyCLI(run=False, args=args)
