"""benchmarks/gpu_check.py: its CPU mode runs every step, and its orchestration keeps each step's numbers apart."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_compare_outputs_exact_and_first_difference():
    a = {"g/1": [1, 2, 3], "g/2": [4, 5, 6, 7], "g/3": [8, 9], "only_a": [1]}
    b = {"g/1": [1, 2, 3], "g/2": [4, 5, 0, 7], "g/3": [8, 9, 10]}
    c = gpu_check.compare_outputs(a, b)
    assert c["n_compared"] == 3 and c["n_only_in_one"] == 1
    assert c["n_mismatched"] == 2 and c["exact_match_rate"] == round(1 / 3, 4)
    assert c["first_diff_min"] == 2  # g/2 differs at 2, g/3 is a prefix of the other: differs at 2 too
    assert c["matched_token_share"] == round((3 + 2 + 2) / (3 + 4 + 3), 4)
    assert gpu_check.first_difference([1, 2], [1, 2]) is None


def _summary(out):
    return json.loads((out / "gpu_check.json").read_text())


def test_missing_packages_are_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.REQUIRED, "build", ["torch", "no_such_module_for_gpu_check"])
    out = tmp_path / "out"
    rc = gpu_check.main(["--dry-run", "--skip", "env", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    s = _summary(out)
    assert rc == 1 and not s["ok"]
    assert s["steps"]["build"]["status"] == "missing"
    assert "no_such_module_for_gpu_check" in s["steps"]["build"]["reason"]
    for step in ("train", "eval_hf", "eval_vllm"):
        assert s["steps"][step]["status"] == "skipped" and "build" in s["steps"][step]["reason"]


def test_a_failing_step_keeps_the_others_numbers(tmp_path, monkeypatch):
    results = {
        "build": {"status": "ok", "parameters_m": 1.0, "tokenizer": "t", "build_s": 0},
        "train": {"status": "ok", "steps": 3, "step_s_median": 0.5, "tokens_per_s": 99.0, "loss_first": 1,
                  "loss_last": 0.5},
        "eval_hf": {"status": "failed", "error": "RuntimeError: boom"},
    }  # fmt: skip

    def fake_spawn(name, config_file, limit, log_file):
        return {**results[name], "wall_s": 0.1}

    monkeypatch.setattr(gpu_check, "_spawn", fake_spawn)
    monkeypatch.setitem(gpu_check.REQUIRED, "eval_vllm", [])
    out = tmp_path / "out"
    rc = gpu_check.main(["--dry-run", "--skip", "env,eval_vllm", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    s = _summary(out)
    assert rc == 1 and s["steps"]["train"]["tokens_per_s"] == 99.0
    assert s["steps"]["eval_hf"]["status"] == "failed" and s["steps"]["eval_vllm"]["status"] == "skipped"
    assert "hf_vs_vllm" not in s["compare"]


def test_a_step_past_its_limit_is_killed(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"workdir": str(tmp_path), "device": "cpu"}))
    r = gpu_check._spawn("env", config, 0.3, tmp_path / "log")  # importing torch alone takes longer
    assert r["status"] == "timeout" and r["wall_s"] < 30


@pytest.mark.slow
def test_dry_run_exercises_every_step_on_cpu(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--dry-run", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    s = _summary(out)
    steps = s["steps"]
    assert rc == 0 and s["ok"], json.dumps(steps, indent=1)[:3000]
    assert steps["build"]["parameters"] > 0 and steps["build"]["tokenizer"] == "piggy/organism"
    train = steps["train"]
    assert train["steps"] == 3 and train["tokens_per_s"] > 0 and train["adapter_exported"]
    assert train["reg_raw_last"] is not None  # the TReFT-prefix penalty ran
    hf = steps["eval_hf"]
    assert hf["adapter"] and hf["hf"]["prompts"] == 6 and hf["hf"]["generated_tokens"] > 0
    assert s["compare"]["hf_vs_hf_noshare"]["exact_match_rate"] == 1.0  # the prefix cache changes no output
    if importlib.util.find_spec("vllm") is None:
        assert steps["eval_vllm"]["status"] == "skipped" and "vllm" in steps["eval_vllm"]["reason"]
    assert (out / "gpu_check.log").is_file()
