"""Collect a grid run's cell results into tables: mean and spread over replicates, paired comparisons.

Every number comes from a cell's ``run/eval/<tag>/summary.json`` (written by ``Evaluate``); the report never
recomputes a metric. A metric is named ``<tag>/<group>.<metric>`` (e.g. ``fit_end/general.alignment``) or
``<tag>/em_f1``. Rows are the combinations of an experiment's non-replicate axes; the replicate axis (``seed``) is
averaged, with the sample standard deviation and every replicate's value shown. Paired comparisons use
a one-sample t-test of the paired differences (``scipy.stats.ttest_1samp``, i.e. the paired t-test) over the
replicates both variants share. Each experiment gets a figure per metric (``figures.py``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy import stats

from piggy_lightning.experiments.analyses import draw_task_vectors, task_vector_cosines, task_vector_lines
from piggy_lightning.experiments.figures import draw
from piggy_lightning.experiments.spec import Comparison, GridError


def cell_metrics(run_dir: Path) -> dict[str, float]:
    """``{"<tag>/<group>.<metric>": value, "<tag>/em_f1": value}`` from every summary under ``run_dir/eval``, and
    ``<tag>/<group>.best`` / ``.avg`` from a perturbation's ``best_avg.json`` or a rephrasing's ``rephrased.json``."""
    out: dict[str, float] = {}
    for path in sorted((run_dir / "eval").glob("**/summary.json")):
        tag = path.parent.relative_to(run_dir / "eval").as_posix()
        summary = json.loads(path.read_text())
        for group, metrics in (summary.get("groups") or {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    out[f"{tag}/{group}.{name}"] = float(value)
        if isinstance(summary.get("em_f1"), (int, float)):
            out[f"{tag}/em_f1"] = float(summary["em_f1"])
        # Best and Avg over trials (perturbation, best_avg.json) and over rephrasings (rephrased.json): Table 1
        for name, groups in (("best_avg.json", "groups"), ("rephrased.json", None)):
            extra = path.parent / name
            if extra.is_file():
                data = json.loads(extra.read_text())
                for group, scores in (data[groups] if groups else data).items():
                    for kind in ("best", "avg"):
                        if isinstance(scores.get(kind), (int, float)):
                            out[f"{tag}/{group}.{kind}"] = float(scores[kind])
    return out


def load_run(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """The manifest, each cell key's status, and each done cell key's metrics of a grid run directory."""
    manifest_path = out / "grid.json"
    if not manifest_path.is_file():
        raise GridError(f"{out}: no grid.json; run `main.py grid run GRID_FILE --out {out}` first")
    manifest = json.loads(manifest_path.read_text())
    statuses, metrics = {}, {}
    for key in {c["key"] for c in manifest["cells"]}:
        status_path = out / "cells" / key / "status.json"
        statuses[key] = json.loads(status_path.read_text()) if status_path.is_file() else {"status": "pending"}
        if statuses[key]["status"] == "done":
            metrics[key] = cell_metrics(out / "cells" / key / "run")
    return manifest, statuses, metrics


def row_label(coords: dict[str, str]) -> str:
    """``axis=value,...`` of a row: how ``paper:`` entries of a grid file name rows."""
    return ",".join(f"{a}={v}" for a, v in coords.items())


def _fmt(values: list[float], metric: str = "") -> str:
    """Mean ± sample sd; two decimals for a share (a ``*_rate`` metric, 0-1), one otherwise (0-100 scores)."""
    if not values:
        return "–"
    digits = 2 if metric.endswith("_rate") else 1
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def experiment_rows(manifest: dict[str, Any], metrics: dict[str, dict[str, float]], name: str) -> list[dict[str, Any]]:
    """One row per combination of the experiment's non-replicate axes: its values per metric and replicate."""
    spec = manifest["experiments"][name]
    replicate = spec["replicate"]
    rows: dict[tuple, dict[str, Any]] = {}
    for cell in (c for c in manifest["cells"] if c["experiment"] == name):
        row_key = tuple((a, v) for a, v in cell["coords"].items() if a != replicate)
        row = rows.setdefault(row_key, {"coords": dict(row_key), "values": defaultdict(dict), "missing": 0})
        found = metrics.get(cell["key"])
        if found is None:
            row["missing"] += 1
            continue
        rep = cell["coords"].get(replicate, "-") if replicate else "-"
        for metric, value in found.items():
            row["values"][metric][rep] = value
    return list(rows.values())


def paired(manifest: dict[str, Any], metrics: dict[str, dict[str, float]], comparison: Comparison) -> dict[str, Any]:
    """Paired difference ``a - b`` over the replicates both variants finished, with the paired t-test."""
    rows = experiment_rows(manifest, metrics, comparison.experiment)
    if comparison.axis is None:  # two metrics of the same cells
        diffs = []
        for row in rows:
            a_vals, b_vals = row["values"].get(comparison.a, {}), row["values"].get(comparison.b, {})
            diffs += [a_vals[r] - b_vals[r] for r in sorted(a_vals.keys() & b_vals.keys())]
        return _test(diffs)

    def side(variant: str) -> dict[str, dict[str, float]]:
        picked = [r for r in rows if r["coords"].get(comparison.axis) == variant]
        return {json.dumps({k: v for k, v in r["coords"].items() if k != comparison.axis}): r["values"] for r in picked}

    a_side, b_side = side(comparison.a), side(comparison.b)
    diffs = []
    for context, values in a_side.items():
        a_vals, b_vals = values.get(comparison.metric, {}), b_side.get(context, {}).get(comparison.metric, {})
        diffs += [a_vals[r] - b_vals[r] for r in sorted(a_vals.keys() & b_vals.keys())]
    return _test(diffs)


def _test(diffs: list[float]) -> dict[str, Any]:
    """Mean of the paired differences and the one-sample t-test of them against 0."""
    result: dict[str, Any] = {"n": len(diffs), "mean_diff": statistics.mean(diffs) if diffs else math.nan}
    if len(diffs) >= 2 and statistics.pstdev(diffs) > 0:
        test = stats.ttest_1samp(diffs, 0.0)
        result.update(t=float(test.statistic), p=float(test.pvalue))
    else:
        result.update(t=math.nan, p=math.nan)
    return result


def export_run(out: Path, dest: Path) -> Path:
    """Copy what a report reads from a grid run into ``dest``, in the same layout, without checkpoints or events.

    ``grid.json``, each cell's ``status.json`` and ``cell.yaml``, and every ``run/eval/<tag>/summary.json`` (with
    the ``best_avg.json`` and ``rephrased.json`` that :func:`cell_metrics` reads beside it): small
    text files to commit beside the report, so ``main.py grid report <dest>`` rebuilds it and a test can check the
    report against the cells' own summaries. Machine-specific paths (the working directory, the interpreter) stay
    in ``status.json`` as they were recorded.
    """
    import shutil

    manifest, statuses, _ = load_run(out)
    if dest.exists():
        shutil.rmtree(dest / "cells", ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "grid.json", dest / "grid.json")
    for key in statuses:
        cell = out / "cells" / key
        for path in [
            cell / "status.json",
            cell / "cell.yaml",
            *sorted((cell / "run" / "eval").glob("**/summary.json")),
            *sorted((cell / "run" / "eval").glob("**/best_avg.json")),  # Table 1's Best / Avg (cell_metrics)
            *sorted((cell / "run" / "eval").glob("**/rephrased.json")),
        ]:
            if path.is_file():
                target = dest / path.relative_to(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    for name in manifest["experiments"]:
        task_vector_cosines(out, manifest, name)  # computed from the checkpoints, which the copy leaves behind
    if (out / "analyses").is_dir():
        shutil.copytree(out / "analyses", dest / "analyses", dirs_exist_ok=True)
    return dest


def wall_seconds(statuses: dict[str, dict[str, Any]]) -> float:
    """Wall time during which at least one cell ran: the union of the cells' [started, finished] intervals, so a
    grid resumed later is not charged for the pause, and parallel cells are not counted twice."""
    spans = sorted((s["started"], s["finished"]) for s in statuses.values() if "started" in s and "finished" in s)
    total, end = 0.0, float("-inf")
    for start, finish in spans:
        if finish > end:
            total += finish - max(start, end)
            end = finish
    return total


def write_report(out: Path, comparisons: tuple[Comparison, ...] = (), path: Path | None = None) -> Path:
    """Write the report of a grid run directory (default ``<out>/report.md``; figures in ``<out>/figures``)."""
    import os

    path = path or out / "report.md"
    figures = Path(os.path.relpath(out / "figures", path.parent))
    manifest, statuses, metrics = load_run(out)
    counts = defaultdict(int)
    for status in statuses.values():
        counts[status["status"]] += 1
    seconds = sum(s.get("seconds", 0) for s in statuses.values())
    lines = [
        f"# Grid `{manifest['name']}`",
        "",
        f"From `{manifest['grid_file']}`: {len(statuses)} cells ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"), {seconds / 60:.1f} min of cell time, {wall_seconds(statuses) / 60:.1f} min of wall time with at least "
        "one cell running.",
        "",
    ]
    for name, spec in manifest["experiments"].items():
        lines += [f"## {name}" + (f": {spec['title']}" if spec["title"] else ""), ""]
        rows = experiment_rows(manifest, metrics, name)
        axes = [a for a in spec["axes"] if a != spec["replicate"]]
        wanted = spec.get("metrics") or sorted({m for r in rows for m in r["values"]})
        paper = spec.get("paper") or {}
        shown = [m for w in wanted for m in ([w, f"paper {w}"] if any(w in p for p in paper.values()) else [w])]
        header = axes + shown + (["missing"] if any(r["missing"] for r in rows) else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            published = paper.get(row_label(row["coords"]), {})
            cells = [row["coords"][a] for a in axes]
            for m in shown:
                if m.startswith("paper "):
                    value = published.get(m.removeprefix("paper "))
                    cells.append("–" if value is None else f"{value:g}")
                else:
                    cells.append(_fmt(list(row["values"].get(m, {}).values()), m))
            if "missing" in header:
                cells.append(str(row["missing"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for metric in wanted:
            safe = metric.replace("/", "_").replace(".", "_")
            figure = draw(rows, axes, metric, f"{name}: {metric}", out / "figures" / f"{name}__{safe}.png")
            if figure is not None:
                lines += [f"![{name} {metric}]({(figures / figure.name).as_posix()})", ""]
        try:
            cosines = task_vector_cosines(out, manifest, name)
        except GridError as err:  # a grid still running, or run with --only: say so in the report
            lines += [f"Task vectors (Fig. 8): not available: {err}", ""]
            cosines = None
        if cosines is not None:
            figure = draw_task_vectors(cosines, out / "figures" / f"{name}__task_vectors.png")
            lines += task_vector_lines(cosines, None if figure is None else (figures / figure.name).as_posix())
    if comparisons:
        lines += [
            "## Paired comparisons",
            "",
            "| experiment | metric | a − b | n | t | p | paper a − b | same sign |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            r = paired(manifest, metrics, c)
            agree = "–"
            if c.paper is not None and not math.isnan(r["mean_diff"]):
                agree = "yes" if c.paper * r["mean_diff"] > 0 else "**no**"
            published = "–" if c.paper is None else f"{c.paper:+g}"
            metric = c.metric if c.axis is not None else "(two metrics)"
            lines.append(
                f"| {c.experiment} | {metric} | {c.a} − {c.b} = {r['mean_diff']:+.1f} | {r['n']} | "
                f"{r['t']:.2f} | {r['p']:.3f} | {published} | {agree} |"
            )
        lines.append("")
    failed = [(k, s) for k, s in statuses.items() if s["status"] == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [
            f"- `{k}` {', '.join(s.get('labels', []))}: `{(s.get('error') or '').splitlines()[-1:]}`" for k, s in failed
        ]
    path.write_text("\n".join(lines) + "\n")
    return path
