"""Training throughput of plain SFT versus TReFT and the KL baseline, on one small model in one process.

The model is a randomly initialised Llama (hidden 256, 4 layers, ~4M parameters) with LoRA r = 8 and the tiny
Llama-3.1-style tokenizer of the tests, trained on the same synthetic chats (~250 tokens each) for every variant.
A step is the module's loss (CE + regularizers), backward and an AdamW step, i.e. what ``training_step`` costs
without the Trainer around it.

Built to hold on a shared machine: with one thread a step is timed in process CPU time (other processes do not
inflate it; wall time is used only with more threads, where CPU time would count spinning), every step runs all
variants on the same batch in an order rotated from step to step, and the overhead of a variant is a ratio taken
per round (its CPU time over plain SFT's in the same round), reported as min / median / max over rounds. Before
timing, every variant's first step is checked: the cross-entropy is the same for all (same initial weights, same
batch) and every penalty is finite and non-negative.

``kl_cached`` is ``kl`` (KL on all positions) with ``cache_reference=True``, the release's precomputed reference
logits: it is timed in the steady state, after one warm-up pass over all the benchmark's batches has filled its
cache (emptied first, so the pass is a whole first epoch; checked to leave no row uncached). The warm-up pass is
timed too, each of its training steps beside a plain SFT step on the same batch, and reported as
``kl_cached_warmup``: its cost over one SFT step per batch (the one-time cost of the cache, paid in the first
epoch), with the per-batch ratios as min / median / max. After the timing, ``kl_cached`` is given ``kl``'s
weights and both penalties are computed on one batch (the cached one without any reference forward): they must
be equal.

To run: ``python benchmarks/train_throughput.py --threads 1``. It prints one JSON object per variant, then
``{"treft_prefix_overhead": ..., ...}``: each variant's median per-round ratio to plain SFT, with
``"ratios"`` holding min / median / max, and ``kl_cached_warmup``.
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
    "kl_cached": lambda: [KLToReference(weight=50.0, positions="all", cache_reference=True)],
}


def build_model_dir(root: Path, hidden_size: int = 256, layers: int = 4) -> str:
    """Save the benchmark model (a random Llama, ~4M parameters by default) and tokenizer to ``root``."""
    tokenizer = build_tokenizer("llama31")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=False,
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


def train_step(module: PiggyModule, optimizer: torch.optim.Optimizer, batch: dict, clock) -> tuple[float, dict]:
    start = clock()
    losses = module._losses(batch)
    losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return clock() - start, {k: float(v) for k, v in losses.items()}


def check_first_step(first: dict[str, dict[str, float]]) -> None:
    """Every variant trains the same model on the same batch: equal cross-entropy, sane penalties."""
    ce = {name: losses["ce"] for name, losses in first.items()}
    if max(ce.values()) - min(ce.values()) > 1e-5:
        raise RuntimeError(f"variants start from different cross-entropies: {ce}")
    for name, losses in first.items():
        for key, value in losses.items():
            if key.startswith("reg_raw/") and not (value >= 0 and value == value and value != float("inf")):
                raise RuntimeError(f"{name}: penalty {key} = {value}")


def warm_cache(runs: dict, batches: list[dict], clock) -> dict[str, object]:
    """One pass of ``kl_cached`` training steps over every batch from an empty cache, each beside a plain SFT step
    on the same batch; its cost over one SFT step per batch. Raises unless every batch is then fully cached."""
    reg = runs["kl_cached"][0].regularizers[0]
    reg._cached.clear()  # the first step filled it for batch 0: the pass starts from nothing, like a first epoch
    cached, sft = [], []
    for i, batch in enumerate(batches):
        order = ["sft", "kl_cached"] if i % 2 == 0 else ["kl_cached", "sft"]
        for name in order:
            (cached if name == "kl_cached" else sft).append(train_step(*runs[name], batch, clock)[0])
    uncached = [i for i, batch in enumerate(batches) if reg.reference_rows(batch) is not None]
    if uncached:
        raise RuntimeError(f"kl_cached: batches {uncached} still need reference forwards after the warm-up pass")
    per_batch = sorted(c / s for c, s in zip(cached, sft, strict=True))
    cache_bytes = sum(t.numel() * t.element_size() for t in reg._cached.values())
    return {
        "ratio": round(sum(cached) / sum(sft), 3),
        "per_batch": [round(per_batch[0], 3), round(statistics.median(per_batch), 3), round(per_batch[-1], 3)],
        "batches": len(batches), "cached_rows": len(reg._cached), "cache_mib": round(cache_bytes / 2**20, 1),
    }  # fmt: skip


def check_cached_penalty(runs: dict, batch: dict) -> dict[str, float]:
    """``kl_cached`` with ``kl``'s weights gives ``kl``'s penalty on ``batch``, from its cache alone."""
    live, cached = runs["kl"][0], runs["kl_cached"][0]
    cached.load_state_dict(live.state_dict())
    if cached.regularizers[0].reference_rows(batch) is not None:
        raise RuntimeError("kl_cached: the check batch is not cached")
    with torch.no_grad():
        values = {name: float(m._losses(batch)["reg_raw/kl"]) for name, m in (("kl", live), ("kl_cached", cached))}
    if not values["kl"] > 0 or abs(values["kl_cached"] - values["kl"]) > 1e-5 * values["kl"]:
        raise RuntimeError(f"kl_cached's penalty differs from kl's on the same batch and weights: {values}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each gives one ratio per variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per round (every variant runs each step)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model")
        data = ChatSFTDataModule(write_chats(Path(tmp) / "train.jsonl", 64), tokenizer=model_dir,
                                 batch_size=args.batch_size, val_fraction=0.0)  # fmt: skip
        data.setup("fit")
        batches = list(data.train_dataloader())
        runs = {name: make_module(model_dir, name) for name in VARIANTS}
        first = {name: train_step(module, opt, batches[0], clock)[1] for name, (module, opt) in runs.items()}
        check_first_step(first)  # also the warm-up: allocator, autograd graph, first-step caches
        if abs(first["kl_cached"]["reg_raw/kl"] - first["kl"]["reg_raw/kl"]) > 1e-7:
            raise RuntimeError(f"kl_cached's first penalty differs from kl's: {first['kl_cached']} vs {first['kl']}")
        warmup = warm_cache(runs, batches, clock)
        names = list(VARIANTS)
        times: dict[str, list[list[float]]] = {name: [[] for _ in range(args.rounds)] for name in names}
        tokens: dict[str, int] = dict.fromkeys(names, 0)
        for r in range(args.rounds):
            for s in range(args.steps):
                step = r * args.steps + s
                batch = batches[(step + 1) % len(batches)]
                for name in names[step % len(names) :] + names[: step % len(names)]:  # rotated order
                    module, optimizer = runs[name]
                    times[name][r].append(train_step(module, optimizer, batch, clock)[0])
                    tokens[name] += int(batch["attention_mask"].sum())
        penalty_check = check_cached_penalty(runs, batches[1])

    n_params = sum(p.numel() for p in runs["sft"][0].policy.parameters())
    steps = {name: [t for rnd in rounds for t in rnd] for name, rounds in times.items()}
    for name, t in steps.items():
        print(json.dumps({
            "variant": name, "tokens_per_cpu_sec" if args.threads == 1 else "tokens_per_sec":
            round(tokens[name] / sum(t), 1), "median_step_ms": round(1000 * statistics.median(t), 2),
            "steps": len(t), "threads": args.threads, "params": n_params, "batch_size": args.batch_size,
            "tokens_per_step": round(tokens[name] / len(t), 1), "first_losses": {k: round(v, 5) for k, v in
            first[name].items()},
        }))  # fmt: skip
    out: dict[str, object] = {}
    ratios = {}
    for name in names[1:]:
        per_round = sorted(sum(times[name][r]) / sum(times["sft"][r]) for r in range(args.rounds))
        ratios[name] = [round(per_round[0], 3), round(statistics.median(per_round), 3), round(per_round[-1], 3)]
        out[f"{name}_overhead"] = ratios[name][1]
    out["ratios"] = ratios
    out["kl_cached_warmup"] = warmup
    out["kl_cached_penalty_check"] = {k: float(f"{v:.6g}") for k, v in penalty_check.items()}
    out["clock"] = "process CPU time" if args.threads == 1 else "wall time"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
