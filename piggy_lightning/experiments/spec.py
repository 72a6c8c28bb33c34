"""The grid file: experiments, each a base config crossed with axes, expanded into cells.

A grid file is YAML::

    name: paper                      # the grid's name; its default output is runs/grid/<name>
    workers: 2                       # cells run in parallel processes, at most this many at once
    threads_per_cell: 1              # OMP/torch threads of each cell (workers x threads <= CPU cores)
    experiments:
      table3:                        # one experiment = one table or figure of the report
        base: [configs/treft_legal.yaml]        # config files, merged in order as by `main.py fit --config ...`
        set: {trainer.max_epochs: 3}            # dotted-key overrides for every cell (list items by index: a.0.b)
        axes:                                   # crossed in order; each cell takes one value of every axis
          method:
            variants:                           # named variants: extra config overlays and/or overrides
              sft: {configs: [configs/ablations/sft.yaml]}
              treft_prefix: {}
          seed:
            keys: [seed_everything]             # a sweep: every key takes each value in turn
            values: [0, 1, 2]
        task_vectors:                           # optional: per-layer task-vector cosines (analyses.py, Fig. 8)
          {axis: method, pairs: [[sft, treft_prefix]]}

A cell's config is resolved (``resolve.py``) to one complete file, so the cell is an ordinary run and its key (the
hash of that file) says whether a finished cell already computed it. Bad input raises :class:`GridError` naming the
file and the field.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_TOP = {"name", "workers", "threads_per_cell", "experiments", "comparisons"}
_EXPERIMENT = {"base", "set", "axes", "replicate", "title", "paper", "metrics", "task_vectors"}
DEFAULT_METRICS = ("fit_end/in_domain.alignment", "fit_end/general.alignment", "fit_end/em_f1")


class GridError(ValueError):
    """A grid file that cannot be expanded; the message names the file and the field."""


@dataclass(frozen=True)
class Variant:
    """One value of an axis: config overlays appended after the base, then dotted-key overrides."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Axis:
    """A named axis of an experiment and its values in order."""

    name: str
    variants: tuple[Variant, ...]
    sweep: bool = False  # `keys` + `values`: every variant sets the same keys


@dataclass(frozen=True)
class Cell:
    """One run of the grid before resolution: its experiment, its value on every axis and what builds its config."""

    experiment: str
    coords: tuple[tuple[str, str], ...]  # ((axis, variant name), ...) in axis order
    configs: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        """``experiment/axis=value,...``, e.g. ``table3/method=sft,seed=0``."""
        return "/".join([self.experiment] + ([",".join(f"{a}={v}" for a, v in self.coords)] if self.coords else []))


@dataclass
class Experiment:
    """An experiment of the grid: base configs, common overrides, axes, and reporting hints."""

    name: str
    base: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]
    axes: tuple[Axis, ...]
    replicate: str | None = None  # the axis whose values are replicates (seeds), averaged in the report
    title: str = ""
    paper: dict[str, Any] = field(default_factory=dict)  # published numbers shown beside the measured ones
    metrics: tuple[str, ...] = DEFAULT_METRICS  # "<evaluation tag>/<group>.<metric>" or "<tag>/em_f1"
    task_vectors: Any = None  # analyses.TaskVectorPairs: per-layer task-vector cosines of variant pairs (Fig. 8)

    def cells(self) -> list[Cell]:
        """Every combination of axis values, in axis order (the last axis varies fastest)."""
        out = []
        for combo in itertools.product(*(axis.variants for axis in self.axes)):
            configs = self.base + tuple(c for v in combo for c in v.configs)
            overrides = self.overrides + tuple(o for v in combo for o in v.overrides)
            coords = tuple((axis.name, v.name) for axis, v in zip(self.axes, combo, strict=True))
            out.append(Cell(self.name, coords, configs, overrides))
        return out


@dataclass(frozen=True)
class Comparison:
    """A paired comparison over the replicates: variant ``a`` against ``b`` of ``axis`` on ``metric``, or, without an
    axis, metric ``a`` against metric ``b`` of the same cells (two interventions evaluated on one finetuned model)."""

    experiment: str
    axis: str | None  # None: ``a`` and ``b`` are two metrics of the same cells (prefix vs query patch)
    a: str
    b: str
    metric: str | None
    paper: float | None = None  # the paper's a - b, if it reports one: the report says whether the signs agree


@dataclass
class Grid:
    """A parsed grid file."""

    path: Path
    name: str
    workers: int
    threads_per_cell: int
    experiments: dict[str, Experiment]
    comparisons: tuple[Comparison, ...] = ()

    def cells(self) -> list[Cell]:
        return [cell for experiment in self.experiments.values() for cell in experiment.cells()]


def _overrides(where: str, raw: Any) -> tuple[tuple[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k for k in raw):
        raise GridError(f"{where}: `set` must map dotted keys to values, got {raw!r}")
    return tuple(raw.items())


def _configs(where: str, raw: Any, root: Path) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise GridError(f"{where}: must be a list of config file paths, got {raw!r}")
    for c in raw:
        if not (root / c).is_file():
            raise GridError(f"{where}: config file {c!r} does not exist (paths are relative to {root})")
    return tuple(raw)


def _axis(where: str, name: str, raw: Any, root: Path) -> Axis:
    if not isinstance(raw, dict) or ("variants" in raw) == ("values" in raw):
        raise GridError(f"{where}: an axis has either `variants: {{name: {{configs, set}}}}` or `keys` + `values`")
    if "variants" in raw:
        unknown = set(raw) - {"variants"}
        if unknown or not isinstance(raw["variants"], dict) or not raw["variants"]:
            raise GridError(f"{where}: `variants` must be a non-empty mapping (unknown fields: {sorted(unknown)})")
        variants = []
        for vname, body in raw["variants"].items():
            body = body or {}
            if not isinstance(body, dict) or set(body) - {"configs", "set"}:
                raise GridError(f"{where}.variants.{vname}: only `configs` and `set` are allowed, got {body!r}")
            variants.append(
                Variant(
                    str(vname),
                    _configs(f"{where}.variants.{vname}.configs", body.get("configs"), root),
                    _overrides(f"{where}.variants.{vname}.set", body.get("set")),
                )
            )
        return Axis(name, tuple(variants))
    keys = raw.get("keys")
    keys = [keys] if isinstance(keys, str) else keys
    if unknown := set(raw) - {"keys", "values"}:
        raise GridError(f"{where}: unknown fields {sorted(unknown)}")
    if not keys or not all(isinstance(k, str) for k in keys):
        raise GridError(f"{where}.keys: a dotted key or a list of them is required")
    values = raw["values"]
    if not isinstance(values, list) or not values:
        raise GridError(f"{where}.values: must be a non-empty list")
    return Axis(name, tuple(Variant(str(v), (), tuple((k, v) for k in keys)) for v in values), sweep=True)


def load_grid(path: str | Path, root: str | Path = ".") -> Grid:
    """Parse and check a grid file; config paths are relative to ``root`` (the repository root, the cwd of cells).

    Args:
        path: The grid YAML.
        root: The directory cells run in and config paths are relative to.
    """
    from piggy_lightning.experiments.analyses import parse_task_vectors  # analyses imports GridError from here

    path, root = Path(path), Path(root)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise GridError(f"{path}: cannot read the grid file: {err}") from err
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid file is a mapping with `experiments`")
    if unknown := set(raw) - _TOP:
        raise GridError(f"{path}: unknown top-level fields {sorted(unknown)} (allowed: {sorted(_TOP)})")
    experiments_raw = raw.get("experiments")
    if not isinstance(experiments_raw, dict) or not experiments_raw:
        raise GridError(f"{path}: `experiments` must be a non-empty mapping of experiment name -> definition")
    experiments = {}
    for ename, body in experiments_raw.items():
        where = f"{path}: experiments.{ename}"
        if "/" in str(ename) or not isinstance(body, dict):
            raise GridError(f"{where}: must be a mapping and its name must not contain '/'")
        if unknown := set(body) - _EXPERIMENT:
            raise GridError(f"{where}: unknown fields {sorted(unknown)} (allowed: {sorted(_EXPERIMENT)})")
        base = _configs(f"{where}.base", body.get("base"), root)
        if not base:
            raise GridError(f"{where}.base: at least one config file is required")
        axes_raw = body.get("axes") or {}
        if not isinstance(axes_raw, dict):
            raise GridError(f"{where}.axes: must be a mapping of axis name -> axis")
        axes = tuple(_axis(f"{where}.axes.{a}", str(a), spec, root) for a, spec in axes_raw.items())
        replicate = body.get("replicate", "seed" if "seed" in axes_raw else None)
        if replicate is not None and replicate not in axes_raw:
            raise GridError(f"{where}.replicate: {replicate!r} is not one of its axes {sorted(axes_raw)}")
        experiments[str(ename)] = Experiment(
            str(ename),
            base,
            _overrides(f"{where}.set", body.get("set")),
            axes,
            replicate,
            str(body.get("title", "")),
            dict(body.get("paper") or {}),
            _metrics(f"{where}.metrics", body.get("metrics")),
            parse_task_vectors(
                f"{where}.task_vectors", body.get("task_vectors"), {a.name: {v.name for v in a.variants} for a in axes}
            ),
        )
    workers, threads = raw.get("workers", 1), raw.get("threads_per_cell", 1)
    for key, value in (("workers", workers), ("threads_per_cell", threads)):
        if not isinstance(value, int) or value < 1:
            raise GridError(f"{path}: `{key}` must be a positive integer, got {value!r}")
    comparisons = tuple(
        _comparison(f"{path}: comparisons.{i}", c, experiments) for i, c in enumerate(raw.get("comparisons") or [])
    )
    return Grid(path, str(raw.get("name") or path.stem), workers, threads, experiments, comparisons)


def _metrics(where: str, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return DEFAULT_METRICS
    if not isinstance(raw, list) or not raw or not all(isinstance(m, str) and "/" in m for m in raw):
        raise GridError(f"{where}: a non-empty list of '<tag>/<group>.<metric>' or '<tag>/em_f1' strings, got {raw!r}")
    return tuple(raw)


def _comparison(where: str, raw: Any, experiments: dict[str, Experiment]) -> Comparison:
    variant_fields, metric_fields = {"experiment", "axis", "a", "b", "metric"}, {"experiment", "a", "b"}
    fields = variant_fields if isinstance(raw, dict) and "axis" in raw else metric_fields
    if not isinstance(raw, dict) or not fields <= set(raw) or set(raw) - fields - {"paper"}:
        raise GridError(
            f"{where}: needs the fields {sorted(variant_fields)} (two variants of an axis on one metric) or "
            f"{sorted(metric_fields)} (two metrics of the same cells), and optionally `paper`; got {raw!r}"
        )
    if raw.get("paper") is not None and not isinstance(raw["paper"], (int, float)):
        raise GridError(f"{where}.paper: the paper's difference a - b as a number, got {raw['paper']!r}")
    experiment = experiments.get(raw["experiment"])
    if experiment is None:
        raise GridError(f"{where}.experiment: no experiment {raw['experiment']!r}")
    if experiment.replicate is None:
        raise GridError(f"{where}: experiment {experiment.name!r} has no replicate axis to pair over")
    paper = float(raw["paper"]) if raw.get("paper") is not None else None
    if "axis" not in raw:
        for side in ("a", "b"):
            if not isinstance(raw[side], str) or "/" not in raw[side]:
                raise GridError(f"{where}.{side}: a metric '<tag>/<group>.<metric>', got {raw[side]!r}")
        return Comparison(experiment.name, None, raw["a"], raw["b"], None, paper)
    axes = {a.name: {v.name for v in a.variants} for a in experiment.axes}
    if raw["axis"] not in axes or {str(raw["a"]), str(raw["b"])} - axes[raw["axis"]]:
        raise GridError(
            f"{where}: {str(raw['a'])!r} and {str(raw['b'])!r} must be values of axis {raw['axis']!r}: {axes}"
        )
    return Comparison(experiment.name, raw["axis"], str(raw["a"]), str(raw["b"]), str(raw["metric"]), paper)


def set_dotted(tree: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``tree[a][b]...`` from ``a.b...``; numeric parts index lists (the last one may be one past the end, which
    appends). The path must exist except its last part.

    Args:
        tree: A resolved config (nested dicts and lists), edited in place.
        key: Dotted key, e.g. ``model.regularizers.0.init_args.weight``.
        value: The value to set.
        where: Who asked, for the error message.
    """
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), where)
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise GridError(f"{where}: {key!r}: index {last!r} is not in a list of {len(node)}")
        if int(last) == len(node):  # one past the end appends, e.g. another question set
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise GridError(f"{where}: {key!r}: {'.'.join(parts[:-1])} is a value, not a mapping or list")


def _child(node: Any, part: str, path: str, where: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise GridError(f"{where}: {path!r}: index {part!r} is not in a list of {len(node)}")
        return node[int(part)]
    if isinstance(node, dict) and part in node and isinstance(node[part], (dict, list)):
        return node[part]
    if isinstance(node, dict) and node.get(part) is None:
        node[part] = {}
        return node[part]
    raise GridError(f"{where}: {path!r} does not exist in the resolved config or is a value")
