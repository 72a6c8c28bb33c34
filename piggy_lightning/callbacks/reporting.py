"""How ``Evaluate`` reports: sample tables, the side-by-side comparison of interventions (per moment, and gathered
over epochs), their findings, the Best/Avg of rephrased question sets, and whether its directory can be written.

Everything here runs on global rank 0 only (the callers hold the reports there). Scalars go through the module's
``log_dict`` while testing (so ``trainer.test()`` returns them) and to every logger otherwise; text tables and
images go to loggers whose experiment has ``add_text`` / ``add_image`` (TensorBoard).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

from piggy_lightning.evaluation.results import write_json_atomic
from piggy_lightning.evaluation.runner import EvaluationReport
from piggy_lightning.interventions.base import Findings

if TYPE_CHECKING:
    from piggy_lightning.evaluation.rephrase import Rephrased

log = logging.getLogger(__name__)
_EPOCH_COMPARISON = re.compile(r"epoch=(\d+)@interventions\.json")


def unwritable(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (made if missing), or None when a test file can be written."""
    probe = directory / f".write_test.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _cell(text: Any, limit: int = 400) -> str:
    text = str(text if text is not None else "")
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\n", " ")


def sample_table(records: list[dict[str, Any]], per_group: int) -> dict[str, str]:
    """Markdown tables (one per group) of the first ``per_group`` responses with their scores."""
    tables: dict[str, list[str]] = {}
    for r in records:
        rows = tables.setdefault(r["group"], ["| question | response | scores |", "|---|---|---|"])
        if len(rows) - 2 >= per_group:
            continue
        scores = ", ".join(
            f"{m}={j['score']:.0f}" if j["score"] is not None else f"{m}={j['status']}"
            for m, j in r.get("judgements", {}).items()
        )
        rows.append(f"| {_cell(r['question'], 200)} | {_cell(r['response'])} | {scores} |")
    return {group: "\n".join(rows) for group, rows in tables.items()}


def comparison_table(groups_by_run: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: tuple[str, ...]) -> str:
    """A markdown table: one row per run (baseline, interventions), one column per (group, metric)."""
    columns = sorted({(g, m) for groups in groups_by_run.values() for g in groups for m in metrics})
    lines = ["| run | " + " | ".join(f"{g}/{m}" for g, m in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for run, groups in groups_by_run.items():
        cells = [groups.get(g, {}).get(m) for g, m in columns]
        lines.append(f"| {run} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines)


def summary_scalars(summary: dict[str, Any], prefix: str) -> dict[str, float]:
    """``<prefix>/<group>/<metric>`` for every scored group metric of a summary, and ``<prefix>/em_f1``."""
    out = {
        f"{prefix}/{group}/{metric}": float(value)
        for group, metrics in summary["groups"].items()
        for metric, value in metrics.items()
        if value is not None
    }
    if "em_f1" in summary:
        out[f"{prefix}/em_f1"] = float(summary["em_f1"])
    return out


def add_text(trainer: L.Trainer, tag: str, text: str) -> None:
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, trainer.global_step)


def log_scalars(trainer: L.Trainer, pl_module: L.LightningModule, scalars: dict[str, float]) -> None:
    """Log at the trainer's step; through the module while testing, so that ``trainer.test()`` returns them."""
    if not scalars:
        return
    if trainer.testing:
        pl_module.log_dict(scalars, rank_zero_only=True)
        return
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=trainer.global_step)


def write_comparison(trainer: L.Trainer, path: Path, runs: Mapping[str, EvaluationReport | None], title: str) -> None:
    """Write every run's per-group metrics side by side (``{run: {group: metrics}}``, the baseline first) as JSON,
    and log them as a text table."""
    groups = {name: report.summary["groups"] for name, report in runs.items() if report is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(groups, indent=2) + "\n")
    table = comparison_table(groups, ("alignment", "misaligned_rate"))
    add_text(trainer, title, table)
    log.info("%s\n%s", title, table)


def log_findings(trainer: L.Trainer, pl_module: L.LightningModule, findings: Findings) -> None:
    """An intervention's findings: scalars at the trainer's step, curves at their own steps, images."""
    log_scalars(trainer, pl_module, findings.scalars)
    steps = sorted({step for curve in findings.curves.values() for step in curve})
    for logger in trainer.loggers:
        for step in steps:  # one call per step, every curve's point at it
            points = {key: curve[step] for key, curve in findings.curves.items() if step in curve}
            logger.log_metrics(points, step=step)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            for tag, image in findings.images.items():
                experiment.add_image(tag, image, trainer.global_step)


def gather_epochs(root: Path) -> dict[str, Any]:
    """Gather every ``epoch=<n>@interventions.json`` in ``root`` (a resumed fit's earlier epochs included) into
    ``epochs@interventions.json``: ``{"epoch=<n>": {run: {group: metrics}}}`` in epoch order, the data of a
    per-epoch curve with and without each intervention (the paper's Fig. 6)."""
    found = [(m, p) for p in root.iterdir() if (m := _EPOCH_COMPARISON.fullmatch(p.name)) is not None]
    epochs = {f"epoch={m.group(1)}": json.loads(p.read_text()) for m, p in sorted(found, key=lambda f: int(f[0][1]))}
    write_json_atomic(root / "epochs@interventions.json", epochs)
    return epochs


def write_rephrased(path: Path, sets: Sequence[Rephrased], scores: Mapping[str, Mapping[str, float]]) -> None:
    """Write each rephrased group's Best and Avg with the settings that made its variants."""
    data = {}
    for s in sets:
        settings = {"source_group": s.questions.group, "variants": s.n, "rephraser": s.rephraser.identity}
        data[s.group] = {**settings, "metric": s.metric, **scores[s.group]}
    write_json_atomic(path, data)
