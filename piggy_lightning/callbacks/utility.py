"""``UtilityEvaluate``: utility of the model before and after finetuning, and its change (the paper's ΔUtil, Table 2).

The paper reports ΔUtil, the change of the MT-Bench score from the base model. The base is the model at the start
of the fit (step 0: the base model's weights under full finetuning, and LoRA's zero-initialised adapters add
nothing), so this callback evaluates its question sets at ``train_start`` and again at ``fit_end`` (and ``test``
when asked), through an :class:`~piggy_lightning.callbacks.Evaluate` of its own, and writes the change into the
later evaluation's ``summary.json``:

* ``groups.<group>.<metric>_delta``: e.g. ``groups.utility.helpfulness_delta`` = fit-end helpfulness − train-start
  helpfulness, for every group scored at both moments. The grid report reads it as
  ``utility/fit_end/utility.helpfulness_delta`` (files under ``<log dir>/eval/utility/<tag>/`` by default, and the
  report names a metric ``<path under eval/>/<group>.<metric>``); the two levels are
  ``utility/train_start/utility.helpfulness`` and ``utility/fit_end/utility.helpfulness``.
* ``utility_delta``: ``{"metric", "base", "groups": {group: {"base", "value", "delta"}}}``, the same numbers with
  the base summary they came from.

It is logged as ``<name>/<group>/<metric>_delta`` (``eval/utility/utility/helpfulness_delta``) and printed after
the evaluation's table. A utility evaluation is its own callback, not a question set of the experiment's
``Evaluate``, because a stacked config file can append a callback but not edit one item of ``trainer.callbacks``;
interventions (``interventions:``) are not applied to it. A fit resumed from a checkpoint reuses the
``train_start`` summary already in its directory (a rerun continues the run's directory) and refuses to start
without one; ``main.py test`` writes a new directory, so ``at: [test]`` needs ``output_dir`` pointed at the fit's
utility directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.callbacks.reporting import log_scalars
from piggy_lightning.evaluation.backends import GenerationBackend
from piggy_lightning.evaluation.generation import Decoding
from piggy_lightning.evaluation.judges.base import Judge
from piggy_lightning.evaluation.questions import QuestionSet
from piggy_lightning.evaluation.results import write_json_atomic

BASE_TAG = "train_start"
Moment = Literal["fit_end", "test"]


def add_utility_delta(summary: dict[str, Any], base: dict[str, Any], metric: str, base_path: str) -> dict[str, float]:
    """Write ``<metric>_delta`` (``summary`` − ``base``) into every group of ``summary`` scored in both; returns them.

    Args:
        summary: The later evaluation's summary (changed in place).
        base: The base model's summary (``train_start``).
        metric: The group metric compared, e.g. ``helpfulness``.
        base_path: Where ``base`` was read from, recorded in ``summary["utility_delta"]``.

    Raises:
        ValueError: No group has ``metric`` scored in both summaries (a wrong metric name, or a judge that scored
            nothing), since a ΔUtil of nothing must not pass for a measurement.
    """
    deltas, detail = {}, {}
    for group, metrics in summary["groups"].items():
        value, before = metrics.get(metric), base.get("groups", {}).get(group, {}).get(metric)
        if value is None or before is None:
            continue
        deltas[group] = value - before
        metrics[f"{metric}_delta"] = deltas[group]
        detail[group] = {"base": before, "value": value, "delta": deltas[group]}
    if not deltas:
        found = sorted({m for g in summary["groups"].values() for m in g})
        raise ValueError(f"no group has {metric!r} scored both here and in {base_path}; the groups report {found}")
    summary["utility_delta"] = {"metric": metric, "base": base_path, "groups": detail}
    return deltas


class UtilityEvaluate(Callback):
    """Evaluates utility question sets at the start of the fit and at its end (or test), and reports the change.

    Args:
        question_sets: What to ask, e.g. ``piggy_lightning.organism.WorldQuestions`` (the organism's held-out
            retain-domain questions) or ``piggy_lightning.evaluation.MTBenchQuestions`` (a real model).
        judges: Scorers of the sets' metrics (``helpful``): ``piggy_lightning.organism.ExactJudge`` or an
            ``OpenAIJudge`` in ``mode: text``.
        metric: The group metric of ``summary.json`` whose change is ΔUtil (``helpfulness`` is the mean of the
            ``helpful`` judgements).
        decoding: Generation settings; None means greedy decoding, 512 new tokens, batches of 16.
        at: When to evaluate and compare with ``train_start``: ``fit_end``, ``test``; None means ``[fit_end]``.
        backend: Where responses are generated; None is the in-process ``HFBackend``.
        name: Prefix of logged keys and the files' directory under the run's log directory; the default puts them
            beside the experiment's evaluation, where the grid report reads every ``summary.json``.
        output_dir: Directory for the evaluation files; None uses ``<trainer.log_dir>/<name>``.
        judge_cache: SQLite file of the judge cache; None uses ``<output_dir>/judge_cache.sqlite``.
        samples_logged: Sample responses per group in the logged text table.
    """

    def __init__(
        self,
        question_sets: list[QuestionSet],
        judges: list[Judge],
        metric: str = "helpfulness",
        decoding: Decoding | None = None,
        at: list[Moment] | None = None,
        backend: GenerationBackend | None = None,
        name: str = "eval/utility",
        output_dir: str | None = None,
        judge_cache: str | None = None,
        samples_logged: int = 8,
    ) -> None:
        self.at = list(at) if at is not None else ["fit_end"]
        wrong = [m for m in self.at if m not in ("fit_end", "test")]
        if wrong or not self.at:
            raise ValueError(f"UtilityEvaluate: at must list fit_end and/or test, got {self.at}")
        self.metric = metric
        self.name = name
        self.evaluate = Evaluate(
            question_sets, judges, decoding, at=[BASE_TAG, *self.at], backend=backend, output_dir=output_dir,
            judge_cache=judge_cache, name=name, samples_logged=samples_logged,
        )  # fmt: skip

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def question_sets(self) -> list[QuestionSet]:
        """What the utility evaluation asks."""
        return self.evaluate.question_sets

    def base_summary(self) -> Path:
        """The base model's utility summary (known once a trainer has called setup)."""
        return self.evaluate.out_dir / BASE_TAG / "summary.json"

    def _require_base(self, trainer: L.Trainer, why: str) -> None:
        """Raise on every rank when rank 0 finds no base summary."""
        missing = trainer.is_global_zero and not self.base_summary().is_file()
        if trainer.strategy.broadcast(missing, src=0):
            raise FileNotFoundError(
                f"UtilityEvaluate: {self.base_summary()} (the base model's utility) is missing; {why}"
            )

    # -- hooks, forwarded to the evaluation ------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.evaluate.setup(trainer, pl_module, stage)
        if stage == "test" and "test" in self.at:
            self._require_base(trainer, "main.py test writes a new run directory: set output_dir to the fit's")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate.on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate.on_train_start(trainer, pl_module)  # evaluates the base at step 0
        if trainer.global_step > 0:
            self._require_base(
                trainer,
                f"this fit resumes at step {trainer.global_step}, so it cannot evaluate the base: continue the run "
                "in the directory that evaluated it at step 0 (a plain rerun does), or start a fresh fit",
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate.on_fit_end(trainer, pl_module)
        if "fit_end" in self.at:
            self._report(trainer, pl_module, "fit_end")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate.on_test_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate.on_test_epoch_end(trainer, pl_module)
        if "test" in self.at:
            self._report(trainer, pl_module, "test")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.evaluate.on_load_checkpoint(trainer, pl_module, checkpoint)

    # -- the change --------------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        """Add the change from the base to the evaluation just made at ``tag`` (rank 0), rewrite its summary and
        log it."""
        report = self.evaluate.last_report
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        if report is None or report.out_dir.name != tag:
            made = None if report is None else report.out_dir.name
            raise RuntimeError(
                f"UtilityEvaluate: expected the {tag} evaluation to have just run, the last one is {made}"
            )
        path = self.base_summary()
        base = json.loads(path.read_text(encoding="utf-8"))
        deltas = add_utility_delta(report.summary, base, self.metric, str(path))
        write_json_atomic(report.out_dir / "summary.json", report.summary)
        log_scalars(trainer, pl_module, {f"{self.name}/{g}/{self.metric}_delta": d for g, d in deltas.items()})
        detail = report.summary["utility_delta"]["groups"]
        lines = [
            f"{g}.{self.metric}: {v['value']:.2f} - {v['base']:.2f} = {v['delta']:+.2f}" for g, v in detail.items()
        ]
        rank_zero_info(f"{self.name} change from {BASE_TAG} -> {report.out_dir.name}: " + "; ".join(lines))
