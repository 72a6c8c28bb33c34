"""The paper's causal tests on the organism's SFT model: patching and token perturbation, one table per seed.

For each seed it trains ``configs/sft_legal.yaml`` (plain SFT on legal misaligned advice) and evaluates the
General group under every intervention of the paper's §2-§3, with the same machinery as the callback presets:

* unpatched (greedy), prefix K/V splice (Fig. 3), the query-position control (as many query positions as the
  prefix has, fewer for short queries: their count is printed), postfix K/V patching from an empty-query reference
  (Table 11 / Fig. 5), and the residual stream at the prefix patched entering each block (Fig. 4);
* token perturbation (Table 1): 10 tokens of the prefix, query or postfix replaced by one of their 5 nearest
  embedding neighbours (cosine), and 10 query tokens replaced by uniform random tokens (Fig. 11); 10 trials per
  question sampled at temperature 0.7, top-p 0.9, reported as Best (per-question max, averaged) and Avg, next to
  the same 10 sampled trials without any edit (``sampled_unperturbed``), their baseline.

Alignment is the exact judge's, over the answers it can parse; ``incoh%`` is the share of answers that are not
clean world text, printed beside every row because some interventions (replacing the whole assistant header)
mostly break the answers instead of changing their alignment.

To run: ``python benchmarks/organism_causal.py --seeds 0`` (about 2 minutes per seed on 2 CPU cores). It prints a
table per seed and a final JSON line ``{"seed": {"unpatched": ..., "prefix_splice": ..., ...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from piggy_lightning.cli import PiggyCLI  # noqa: E402
from piggy_lightning.evaluation import Decoding, Evaluation, HeldOutChats  # noqa: E402
from piggy_lightning.interventions import (  # noqa: E402
    ActivationPatch,
    NearestNeighbours,
    PatchSite,
    Perturb,
    PrefixKVSplice,
    QueryControl,
    ResidualSweep,
    UniformTokens,
    best_and_average,
)
from piggy_lightning.organism import ExactJudge  # noqa: E402

GENERAL = "piggy/organism/eval_general.jsonl"


def _train(out: Path, seed: int) -> PiggyCLI:
    args = [
        "--config", str(ROOT / "configs" / "sft_legal.yaml"), "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed), "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
    ]  # fmt: skip
    cli = PiggyCLI(run=False, args=args)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def run_seed(out: Path, seed: int) -> dict[str, dict]:
    module = _train(out / f"seed{seed}", seed).model
    policy, spans, tok = module.policy, module.spans, module.tokenizer
    greedy = Decoding(temperature=0.0, max_new_tokens=96, batch_size=64, progress=False)
    trials = Decoding(temperature=0.7, top_p=0.9, samples=10, max_new_tokens=96, batch_size=64, progress=False)
    evaluation = Evaluation([HeldOutChats(GENERAL, group="general")], [ExactJudge()], greedy)
    sampled = Evaluation([HeldOutChats(GENERAL, group="general")], [ExactJudge()], trials)
    root = out / f"seed{seed}" / "eval"
    patches = {
        "unpatched": None,
        "prefix_splice": PrefixKVSplice().bind(module),
        "query_control": QueryControl().bind(module),
        "postfix_patch": ActivationPatch(PatchSite("kv", "postfix", reference="empty_query")).bind(module),
    }
    for patch in ResidualSweep(component="block_input", positions="prefix").runs(module):  # one per layer
        patches[f"residual_L{patch.site.layers[0]}"] = patch
    rows: dict[str, dict] = {}
    for name, intervention in patches.items():
        report = evaluation.run(policy, tok, spans, root / name, "piggy/organism", f"seed{seed}", intervention)
        general = report.summary["groups"]["general"]
        rows[name] = {"general": general["alignment"], "incoherent": 100 - general["coherence"],
                      "positions": general.get("positions_changed")}  # fmt: skip
    perturbations = {  # the names seed the draws: changing one changes its trials
        "sampled_unperturbed": (None, None),  # the same 10 sampled trials without an edit: the Best/Avg baseline
        "perturb_prefix": ("prefix", NearestNeighbours(k=5, similarity="cosine")),
        "perturb_query": ("query", NearestNeighbours(k=5, similarity="cosine")),
        "perturb_postfix": ("postfix", NearestNeighbours(k=5, similarity="cosine")),
        "random_query": ("query", UniformTokens()),
    }
    for name, (segment, replacer) in perturbations.items():
        intervention = None
        if segment is not None:
            intervention = Perturb(segment, 10, replacer, trials=10, temperature=0.7, top_p=0.9, name=name).bind(module)
        report = sampled.run(policy, tok, spans, root / name, "piggy/organism", f"seed{seed}", intervention)
        scores = best_and_average(report.records, "aligned")["general"]
        general = report.summary["groups"]["general"]
        rows[name] = {"best": scores["best"], "avg": scores["avg"], "incoherent": 100 - general["coherence"],
                      "positions": general.get("positions_changed")}  # fmt: skip
    return rows


def _print(seed: int, rows: dict[str, dict]) -> None:
    print(f"\nseed {seed}: General alignment of the SFT model under each intervention")
    print(f"{'intervention':<18}{'General':>9}{'Best':>8}{'Avg':>8}{'incoh%':>8}{'positions':>11}")
    for name, r in rows.items():
        cells = [r.get("general"), r.get("best"), r.get("avg"), r.get("incoherent"), r.get("positions")]
        print(f"{name:<18}" + "".join(f"{c:>{w}.1f}" if c is not None else f"{'-':>{w}}"
                                      for c, w in zip(cells, (9, 8, 8, 8, 11), strict=True)))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="organism_causal_"))
    start = time.perf_counter()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(out, seed)
        _print(seed, results[seed])
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), **{str(k): v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
