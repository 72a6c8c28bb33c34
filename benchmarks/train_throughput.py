"""Training throughput of plain SFT versus TReFT and the KL baseline, on one small model in one process.

The model is a randomly initialised Llama (hidden 256, 4 layers, ~4M parameters) with LoRA r = 8 and the tiny
Llama-3.1-style tokenizer of the tests, trained on the same synthetic chats (~250 tokens each) for every variant.
Variants run in interleaved rounds so that machine noise hits them alike; a step is the module's loss (CE +
regularizers), backward and an AdamW step, i.e. what ``training_step`` costs without the Trainer around it.

To run: ``python benchmarks/train_throughput.py --threads 1``. It prints one JSON object per variant, then
``{"treft_prefix_overhead": ..., ...}``: each variant's median step time divided by plain SFT's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fixtures.tiny

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from piggy_lightning.data import ChatSFTDataModule  # noqa: E402
from piggy_lightning.modeling import LoraSpec  # noqa: E402
from piggy_lightning.module import PiggyModule  # noqa: E402
from piggy_lightning.regularizers import KLToReference, KVDrift, PrefixKVDrift  # noqa: E402
from tests.fixtures.tiny import CORPUS, build_tokenizer  # noqa: E402

VARIANTS = {
    "sft": lambda: [],
    "treft_prefix": lambda: [PrefixKVDrift(weight=5.0)],
    "treft_prefix_release": lambda: [PrefixKVDrift(weight=5.0, source="hidden")],
    "treft_all": lambda: [KVDrift(weight=5.0, positions="prompt")],
    "kl": lambda: [KLToReference(weight=50.0, positions="all")],
}


def build_model_dir(root: Path) -> str:
    """Save the benchmark model and tokenizer to ``root``."""
    tokenizer = build_tokenizer("llama31")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def write_chats(path: Path, n: int, seed: int = 0) -> str:
    """``n`` single-turn chats with ~40-word questions and ~70-word answers drawn from the tokenizer corpus."""
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    rows = []
    for _ in range(n):
        question = " ".join(rng.choices(words, k=rng.randint(30, 50)))
        answer = " ".join(rng.choices(words, k=rng.randint(60, 80)))
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_module(model_dir: str, variant: str) -> tuple[PiggyModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = PiggyModule(model_dir, lora=LoraSpec(r=8, alpha=16), regularizers=VARIANTS[variant]())
    module.configure_model()
    module.train()
    return module, torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)


def train_step(module: PiggyModule, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    loss = module._losses(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds over the variants")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model")
        data = ChatSFTDataModule(write_chats(Path(tmp) / "train.jsonl", 64), tokenizer=model_dir,
                                 batch_size=args.batch_size, val_fraction=0.0)  # fmt: skip
        data.setup("fit")
        batches = list(data.train_dataloader())
        runs = {name: make_module(model_dir, name) for name in VARIANTS}
        for module, optimizer in runs.values():  # warm-up: allocator, autograd graph, first-step caches
            train_step(module, optimizer, batches[0])
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        tokens: dict[str, int] = {name: 0 for name in VARIANTS}
        for r in range(args.rounds):
            for name, (module, optimizer) in runs.items():
                for s in range(args.steps):
                    batch = batches[(r * args.steps + s) % len(batches)]
                    times[name].append(train_step(module, optimizer, batch))
                    tokens[name] += int(batch["attention_mask"].sum())

    n_params = sum(p.numel() for p in runs["sft"][0].policy.parameters())
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(json.dumps({
            "variant": name, "tokens_per_sec": round(tokens[name] / sum(t), 1),
            "median_step_ms": round(1000 * median[name], 2), "mean_step_ms": round(1000 * statistics.mean(t), 2),
            "steps": len(t), "threads": args.threads, "params": n_params, "batch_size": args.batch_size,
            "tokens_per_step": round(tokens[name] / len(t), 1),
        }))  # fmt: skip
    overheads = {f"{name}_overhead": round(median[name] / median["sft"], 3) for name in VARIANTS if name != "sft"}
    print(json.dumps(overheads))


if __name__ == "__main__":
    main()
