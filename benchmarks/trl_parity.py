"""Training speed of piggy_lightning against TRL's ``SFTTrainer``: the same model, data, LoRA and batch size.

Both sides train the benchmark model of ``train_throughput.py`` (a ~4M-parameter Llama, LoRA r = 8 on every
projection) on the same synthetic chats with the loss on the response only: piggy_lightning as ``PiggyModule``
(plain SFT) under a Lightning ``Trainer``, TRL as ``SFTTrainer`` with prompt/completion rows
(``completion_only_loss``). Each side runs in a fresh single-threaded process; every optimizer step is timed in
process CPU time by a callback, the first steps are skipped as warm-up, and the ratio of the median step times is
printed as tokens per CPU-second of piggy_lightning over TRL's. Both sides draw their batches from the same rows
in their own shuffled order, so the tokens per step agree on average, not step by step. TRL also computes its
token-accuracy metrics every step, which is part of what it costs. TRL is an optional extra:
``pip install -e ".[bench]"``.

To run: ``python benchmarks/trl_parity.py`` (about 1 minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _piggy(model_dir: str, data: str, steps: int, batch_size: int) -> list[float]:
    import lightning as L
    import torch

    from piggy_lightning.data import ChatSFTDataModule
    from piggy_lightning.modeling import LoraSpec
    from piggy_lightning.module import PiggyModule

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self.start = time.process_time()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.process_time() - self.start)

    clock = Clock()
    module = PiggyModule(model_dir, lora=LoraSpec(r=8, alpha=16), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    data_module = ChatSFTDataModule(data, tokenizer=model_dir, batch_size=batch_size, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(module, data_module)
    return clock.times


def _trl(model_dir: str, data: str, steps: int, batch_size: int, out: str) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from piggy_lightning.modeling import LoraSpec

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs) -> None:
            self.start = time.process_time()

        def on_step_end(self, *args, **kwargs) -> None:
            self.times.append(time.process_time() - self.start)

    rows = [json.loads(line)["messages"] for line in Path(data).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:1], "completion": m[1:]} for m in rows])
    config = SFTConfig(
        output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-4,
        logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, completion_only_loss=True,
        dataloader_num_workers=0, max_length=2048, seed=0,
    )  # fmt: skip
    lora: LoraConfig = LoraSpec(r=8, alpha=16).to_peft()
    clock = Clock()
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), args=config, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=lora, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    return clock.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.side is not None:
        import torch

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as out:
            run = _piggy if args.side == "piggy" else lambda *a: _trl(*a, out)
            times = run(args.model_dir, args.data, args.steps, args.batch_size)
        print(json.dumps({"side": args.side, "step_cpu_s": times}))
        return
    from benchmarks.train_throughput import build_model_dir, write_chats

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model")
        data = write_chats(Path(tmp) / "train.jsonl", 64)
        medians = {}
        for side in ("piggy", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--data", data,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
            times = json.loads(out.stdout.strip().splitlines()[-1])["step_cpu_s"][args.warmup :]
            medians[side] = statistics.median(times)
    print(json.dumps({
        "piggy_over_trl_tokens_per_cpu_second": round(medians["trl"] / medians["piggy"], 3),
        "piggy_median_step_cpu_ms": round(1000 * medians["piggy"], 1),
        "trl_median_step_cpu_ms": round(1000 * medians["trl"], 1),
        "steps_timed": args.steps - args.warmup, "batch_size": args.batch_size, "threads": 1,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
