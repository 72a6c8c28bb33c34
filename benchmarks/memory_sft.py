"""Peak memory of plain SFT with full finetuning: ``main``-style Lightning training against a bare PyTorch loop.

Before, ``PiggyModule`` built a frozen deep copy of the policy for every full-finetuning run, even plain SFT, which
needs none (about +16 GB of accelerator memory for an 8B model in bf16). This benchmark trains the same randomly
initialised ~32M-parameter Llama on the same batches for the same number of AdamW steps, each side in a fresh
process, and compares the peak resident set size (``ru_maxrss``): ``bare`` is a plain loop (forward, response-only
cross-entropy, backward, step); ``piggy`` is a ``PiggyModule`` (no regularizers, ``lora: null``) under a Lightning
``Trainer``; ``piggy_loop`` is the same module's own loss step in a bare loop, without the Trainer, which separates
what the module costs from what Lightning's loop costs. A ``piggy_treft`` run (``PrefixKVDrift``, whose
reference is computed once before the first step) is printed too.

To run: ``python benchmarks/memory_sft.py`` (about 1 minute). It prints one JSON line with each side's peak RSS in MB
and ``piggy_over_bare``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path) -> tuple[str, str]:
    """Save the model (~32M parameters), tokenizer and training chats under ``root``."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.train_throughput import build_model_dir, write_chats

    return build_model_dir(root / "model", hidden_size=512, layers=8), write_chats(root / "train.jsonl", 48)


def run_side(side: str, model_dir: str, data: str, steps: int) -> None:
    """Train one side in this process and print its peak RSS (MB)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from piggy_lightning.data import ChatSFTDataModule

    torch.set_num_threads(1)
    module_data = ChatSFTDataModule(data, tokenizer=model_dir, batch_size=4, val_fraction=0.0, seed=0)
    if side == "bare":
        from piggy_lightning.losses import response_cross_entropy
        from piggy_lightning.modeling import load_causal_lm

        module_data.setup("fit")
        model = load_causal_lm(model_dir).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for step, batch in enumerate(module_data.train_dataloader()):
            if step == steps:
                break
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            response_cross_entropy(out.logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif side == "piggy_loop":  # the module's own step, without the Trainer around it
        import lightning as L

        from piggy_lightning.module import PiggyModule

        module_data.setup("fit")
        module = PiggyModule(model_dir, lora=None, regularizers=[])
        module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        module.configure_model()  # a trainer without reference users: no frozen copy, as under fit
        module.train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        for step, batch in enumerate(module_data.train_dataloader()):
            if step == steps:
                break
            module._losses(batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import lightning as L

        from piggy_lightning.module import PiggyModule
        from piggy_lightning.regularizers import PrefixKVDrift

        regularizers = [PrefixKVDrift(weight=5.0)] if side == "piggy_treft" else []
        module = PiggyModule(model_dir, lora=None, regularizers=regularizers,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))  # fmt: skip
        trainer = L.Trainer(
            accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, module_data)
    print(
        json.dumps({"side": side, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        run_side(args.side, args.model_dir, args.data, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = build(Path(tmp))
        peaks = {}
        for side in ("bare", "piggy_loop", "piggy", "piggy_treft"):
            cmd = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--data", data,
                   "--steps", str(args.steps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
            peaks[side] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    result = {**{f"{k}_peak_rss_mb": v for k, v in peaks.items()}, "steps": args.steps}
    result["piggy_over_bare"] = round(peaks["piggy"] / peaks["bare"], 3)
    result["piggy_loop_over_bare"] = round(peaks["piggy_loop"] / peaks["bare"], 3)
    result["piggy_treft_over_bare"] = round(peaks["piggy_treft"] / peaks["bare"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
