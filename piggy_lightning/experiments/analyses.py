"""Analyses of a grid run that read the cells' weights, not their summaries: the task-vector similarity (Fig. 8).

An experiment may declare ``task_vectors: {axis: method, pairs: [[sft, interleave_20], [sft, treft_prefix]]}``:
for every pair and every replicate (and every combination of the experiment's other axes) the report compares the
task vectors (``W_finetuned - W_initial``, :mod:`piggy_lightning.analysis.task_vectors`) of the two cells layer by
layer. The cosines are computed from the cells' ``checkpoints/last.ckpt`` when the run directory has them and
written to ``<run dir>/analyses/<experiment>.task_vectors.json``; an exported run (no checkpoints) keeps that file,
so the committed report rebuilds from it. A declared analysis with no checkpoint and no saved file fails loudly.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggy_lightning.experiments.spec import GridError


@dataclass(frozen=True)
class TaskVectorPairs:
    """The pairs of values of ``axis`` whose task vectors are compared per layer."""

    axis: str
    pairs: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "pairs": [list(p) for p in self.pairs]}


def parse_task_vectors(where: str, raw: Any, axes: dict[str, set[str]]) -> TaskVectorPairs | None:
    """Check an experiment's ``task_vectors`` field against its axes (``{axis name: {variant names}}``)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"axis", "pairs"}:
        raise GridError(f"{where}: needs exactly the fields ['axis', 'pairs'], got {raw!r}")
    axis = raw["axis"]
    if axis not in axes:
        raise GridError(f"{where}.axis: {axis!r} is not one of the experiment's axes {sorted(axes)}")
    pairs = raw["pairs"]
    if not isinstance(pairs, list) or not pairs:
        raise GridError(f"{where}.pairs: a non-empty list of [a, b] pairs of {axis!r} values, got {pairs!r}")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, list) or len(pair) != 2 or {str(p) for p in pair} - axes[axis]:
            raise GridError(f"{where}.pairs.{i}: two values of axis {axis!r} ({sorted(axes[axis])}), got {pair!r}")
        out.append((str(pair[0]), str(pair[1])))
    return TaskVectorPairs(axis, tuple(out))


def _path(out: Path, experiment: str) -> Path:
    return out / "analyses" / f"{experiment}.task_vectors.json"


def _run_dir(out: Path, key: str) -> Path:
    return out / "cells" / key / "run"


def task_vector_cosines(out: Path, manifest: dict[str, Any], experiment: str) -> dict[str, Any] | None:
    """``{"layers": [...], "pairs": {"a vs b": {"<context>": {layer: cosine}}}}`` of a declared analysis, computed
    from the checkpoints when every compared cell has one (and saved), else read from the saved file; None when the
    experiment declares none. ``<context>`` names the replicate and the other axes' values of the compared cells."""
    spec = manifest["experiments"][experiment].get("task_vectors")
    if not spec:
        return None
    axis, pairs = spec["axis"], [tuple(p) for p in spec["pairs"]]
    cells = [c for c in manifest["cells"] if c["experiment"] == experiment]
    checkpoints = {c["key"]: _run_dir(out, c["key"]) / "checkpoints" / "last.ckpt" for c in cells}
    compared = [c for c in cells if c["coords"][axis] in {v for p in pairs for v in p}]
    if not compared or not all(checkpoints[c["key"]].is_file() for c in compared):
        saved = _path(out, experiment)
        if saved.is_file():
            return json.loads(saved.read_text())
        missing = sorted(str(checkpoints[c["key"]]) for c in compared if not checkpoints[c["key"]].is_file())
        raise GridError(f"{experiment}: task_vectors needs the cells' checkpoints, and {missing[:3]} are missing")

    from piggy_lightning.analysis import layer_cosines, load_task_vector

    vectors: dict[str, Any] = {}
    by_context: dict[str, dict[str, str]] = {}
    for cell in compared:
        context = ",".join(f"{a}={v}" for a, v in cell["coords"].items() if a != axis)
        by_context.setdefault(context, {})[cell["coords"][axis]] = cell["key"]
    result: dict[str, Any] = {"layers": [], "pairs": {}}
    for a, b in pairs:
        per_context = {}
        for context, keys in sorted(by_context.items()):
            if a in keys and b in keys:
                for key in (keys[a], keys[b]):
                    if key not in vectors:
                        vectors[key] = load_task_vector(_run_dir(out, key))
                cosines = layer_cosines(vectors[keys[a]], vectors[keys[b]])
                per_context[context] = {str(layer): value for layer, value in cosines.items()}
        result["pairs"][f"{a} vs {b}"] = per_context
    result["layers"] = sorted({layer for p in result["pairs"].values() for c in p.values() for layer in c}, key=_order)
    saved = _path(out, experiment)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result, indent=1))
    return result


def _layer_stats(contexts: dict[str, dict[str, float]], layer: str) -> tuple[float, float, int]:
    """Mean, sample sd (0 for one value) and count of one layer's cosine over the compared contexts."""
    values = [c[layer] for c in contexts.values() if layer in c]
    mean = statistics.mean(values) if values else float("nan")
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _order(layer: str) -> tuple[int, int]:
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def task_vector_lines(result: dict[str, Any], figure: str | None) -> list[str]:
    """The report's markdown for an analysis: mean ± sd of the cosine per pair and layer over the contexts."""
    layers = result["layers"]
    lines = [
        "Task-vector cosine similarity per layer (Fig. 8), mean ± sd over the replicates:",
        "",
        "| pair | " + " | ".join(f"layer {layer}" if layer.isdigit() else layer for layer in layers) + " | n |",
        "|" + "---|" * (len(layers) + 2),
    ]
    for pair, contexts in result["pairs"].items():
        cells = []
        for layer in layers:
            mean, sd, n = _layer_stats(contexts, layer)
            cells.append(f"{mean:.3f} ± {sd:.3f}" if n > 1 else f"{mean:.3f}")
        lines.append(f"| {pair} | " + " | ".join(cells) + f" | {len(contexts)} |")
    lines.append("")
    if figure is not None:
        lines += [f"![task vectors]({figure})", ""]
    return lines


def draw_task_vectors(result: dict[str, Any], path: Path) -> Path | None:
    """Per-layer cosine of each pair (mean, with the sd as error bars) drawn with matplotlib; None if empty."""
    from piggy_lightning.experiments.figures import plt, save

    layers = [layer for layer in result["layers"] if layer.isdigit()]
    if not layers or not result["pairs"]:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for pair, contexts in result["pairs"].items():
        means, sds = [], []
        for layer in layers:
            mean, sd, _ = _layer_stats(contexts, layer)
            means.append(mean)
            sds.append(sd)
        ax.errorbar([int(x) for x in layers], means, yerr=sds, marker="o", capsize=3, label=pair)
    ax.set_xlabel("layer")
    ax.set_ylabel("task-vector cosine")
    ax.set_xticks([int(x) for x in layers])
    ax.legend(fontsize=7)
    return save(fig, path)
