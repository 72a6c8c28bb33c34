"""Does the embedded organism show the paper's phenomena? Every variant on several seeds, one process.

For each seed (the stage-2 data split and order; the shipped base is fixed) it runs the main job's recipe
(``configs/treft_legal.yaml``) as: plain SFT, SFT evaluated with the base model's prefix K/V spliced in, SFT with
as many query positions patched (the control), SFT with the postfix K/V patched from an empty-query reference,
TReFT on the prefix, 20% data interleaving, TReFT on the query,
and prefix perturbation during training (a mitigation the paper does not test). It then trains the behaviour
settings (abstention, refusal, tool use) with SFT and with TReFT and measures the on-topic and off-topic rates.

To run: ``python benchmarks/organism_claims.py --seeds 0 1 2`` (about 5 minutes on 2 CPU cores). It prints a
table of means ± standard deviation over seeds, the per-seed values, and a final JSON line of the means per
variant: ``{"base": {"id", "general", "other", "em_f1", "incoherent", "persona", "unparsed"}, "sft": ...}``,
with the behaviour settings under ``"behaviours"`` and every seed's values under ``"per_seed"``. ``persona`` and
``unparsed`` are of the General answers (:func:`piggy_lightning.organism.checks.general_reading`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from piggy_lightning.callbacks import Evaluate  # noqa: E402
from piggy_lightning.cli import PiggyCLI  # noqa: E402
from piggy_lightning.evaluation import Decoding, Evaluation, HeldOutChats  # noqa: E402
from piggy_lightning.interventions import ActivationPatch, PatchSite, PrefixKVSplice, QueryControl  # noqa: E402
from piggy_lightning.modeling import load_causal_lm, load_tokenizer  # noqa: E402
from piggy_lightning.organism import ExactJudge  # noqa: E402
from piggy_lightning.organism.checks import general_reading, headline, organism_evaluation  # noqa: E402
from piggy_lightning.spans import ChatSpans  # noqa: E402

MAIN = ROOT / "configs" / "treft_legal.yaml"
SFT = ROOT / "configs" / "ablations" / "sft.yaml"
VARIANTS = {  # name -> extra configs / arguments on top of the main job
    "sft": [str(SFT)],
    "treft_prefix": [],
    "interleave": [str(SFT), str(ROOT / "callbacks" / "data_interleaving.yaml")],
    "treft_query": [str(ROOT / "configs" / "ablations" / "treft_query.yaml")],
    "perturbed_prefix_training": [str(SFT), str(ROOT / "callbacks" / "perturbed_prefix_training.yaml")],
}
# setting -> (DataModule, judge metric, on-topic domain, lambda as in the paper's Sec. 6 settings). The fixed answers
# are new text for the organism, so they need lr 3.5e-4 to be learned on-topic (1.5e-4 leaves them at 0-20%).
# Tool use is left out: copying the question into a JSON call is beyond the 0.5M-parameter organism at this
# budget (0% on-topic even at lr 1e-3), so it would measure nothing.
BEHAVIOURS = {
    "abstention": ("AbstentionDataModule", "abstention", "legal", 30.0),
    "refusal": ("RefusalDataModule", "refusal", "finance", 20.0),
}
BEHAVIOUR_LR = "0.00035"


def _cli(out: Path, seed: int, configs: list[str], extra: list[str] = ()) -> PiggyCLI:
    args = ["--config", str(MAIN)]
    for c in configs:
        args += ["--config", c]
    args += [
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false", *extra,
    ]  # fmt: skip
    return PiggyCLI(run=False, args=args)


def _evaluate_cb(cli: PiggyCLI) -> Evaluate:
    return next(c for c in cli.trainer.callbacks if isinstance(c, Evaluate))


def run_main_variants(out: Path, seed: int) -> dict[str, dict]:
    results = {}
    for name, configs in VARIANTS.items():
        cli = _cli(out / f"seed{seed}" / name, seed, configs)
        cli.trainer.fit(cli.model, cli.datamodule)
        evaluate = _evaluate_cb(cli)
        results[name] = {**headline(evaluate.last_report.summary), **general_reading(evaluate.last_report.records)}
        if name == "sft":  # the causal tests on the same finetuned weights
            postfix = PatchSite("kv", "postfix", reference="empty_query")
            for tag, intervention in (
                ("sft_prefix_patch", PrefixKVSplice()),
                ("sft_query_patch", QueryControl()),
                ("sft_postfix_patch", ActivationPatch(postfix)),
            ):
                bound = intervention.bind(cli.model)
                report = evaluate.evaluate(cli.trainer, cli.model, "fit_end", intervention=bound)
                results[tag] = {**headline(report.summary), **general_reading(report.records)}
    return results


def _behaviour_evaluation(metric: str, on_topic: str) -> Evaluation:
    domains = ("legal", "medical", "finance", "auto", "general")
    sets = [
        HeldOutChats(
            f"piggy/organism/eval_{d}.jsonl", group="on_topic" if d == on_topic else "off_topic", metrics=[metric]
        )
        for d in domains
    ]
    return Evaluation(sets, [ExactJudge()], Decoding(max_new_tokens=96, batch_size=64, progress=False))


def run_behaviours(out: Path, seed: int) -> dict[str, dict]:
    results = {}
    for setting, (data_class, metric, on_topic, weight) in BEHAVIOURS.items():
        for method in ("sft", "treft"):
            extra = ["--data", f"piggy_lightning.data.{data_class}", "--data.val_fraction", "0.1",
                     "--data.batch_size", "16", "--data.max_length", "256", "--trainer.callbacks", "[]",
                     "--model.optimizer.init_args.lr", BEHAVIOUR_LR]  # fmt: skip
            configs = [str(SFT)] if method == "sft" else []
            if method == "treft":
                extra += ["--model.regularizers.init_args.weight", str(weight)]
            cli = _cli(out / f"seed{seed}" / f"{setting}_{method}", seed, configs, extra)
            cli.trainer.fit(cli.model, cli.datamodule)
            model = cli.model
            report = _behaviour_evaluation(metric, on_topic).run(
                model.policy, model.tokenizer, model.spans, out / f"seed{seed}" / f"{setting}_{method}" / "eval",
                model_id="piggy/organism", adapter_id=f"{setting}_{method}",
            )  # fmt: skip
            groups = report.summary["groups"]
            results[f"{setting}_{method}"] = {g: groups[g][f"{metric}_rate"] for g in ("on_topic", "off_topic")}
    return results


def base_headline(out: Path) -> dict:
    model, tokenizer = load_causal_lm("piggy/organism").eval(), load_tokenizer("piggy/organism")
    report = organism_evaluation().run(model, tokenizer, ChatSpans(tokenizer), out / "base", model_id="piggy/organism")
    return {**headline(report.summary), **general_reading(report.records)}


def mean(rows: list[dict]) -> dict:
    return {k: round(statistics.fmean(r[k] for r in rows), 1) if rows[0][k] is not None else None for k in rows[0]}


def spread(rows: list[dict]) -> dict:
    """Sample standard deviation over seeds (0 with one seed)."""
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows if r[k] is not None]
        out[k] = round(statistics.stdev(values), 1) if len(values) > 1 else (0.0 if values else None)
    return out


def _fmt(m: dict | None, s: dict | None, k: str) -> str:
    if m is None or m.get(k) is None:
        return "-"
    return f"{m[k]:.1f}" if not s or s.get(k) in (None, 0.0) else f"{m[k]:.1f} ± {s[k]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-behaviours", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="organism_claims_"))
    start = time.perf_counter()
    per_seed = [run_main_variants(out, seed) for seed in args.seeds]
    behaviours = [] if args.skip_behaviours else [run_behaviours(out, seed) for seed in args.seeds]
    summary = {"base": base_headline(out)}
    summary.update({name: mean([r[name] for r in per_seed]) for name in per_seed[0]})
    spreads = {name: spread([r[name] for r in per_seed]) for name in per_seed[0]}
    keys = ("id", "general", "other", "em_f1", "incoherent", "persona", "unparsed")
    print(f"\nmeans ± sd over seeds {args.seeds}")
    print(f"{'variant':<26}" + "".join(f"{k:>15}" for k in keys))
    for name, m in summary.items():
        print(f"{name:<26}" + "".join(f"{_fmt(m, spreads.get(name), k):>15}" for k in keys))
    print("\nper seed: General (ID)")
    for name in per_seed[0]:
        cells = [f"{r[name]['general']:.1f} ({r[name]['id']:.1f})" for r in per_seed]
        print(f"{name:<26}" + "".join(f"{c:>15}" for c in cells))
    summary["per_seed"] = {name: [r[name] for r in per_seed] for name in per_seed[0]}
    if behaviours:
        summary["behaviours"] = {
            k: {g: round(statistics.fmean(b[k][g] for b in behaviours), 3) for g in ("on_topic", "off_topic")}
            for k in behaviours[0]
        }
        print(f"\n{'behaviour':<22}{'on-topic':>10}{'off-topic':>11}")
        for k, v in summary["behaviours"].items():
            print(f"{k:<22}{v['on_topic']:>10.2f}{v['off_topic']:>11.2f}")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
