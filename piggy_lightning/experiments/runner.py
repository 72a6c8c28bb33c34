"""Run a grid's cells as ordinary ``main.py fit`` processes, in parallel, resumably.

Layout of a grid run directory::

    <out>/grid.json                 the expanded grid: every cell's label, coordinates and key
    <out>/cells/<key>/cell.yaml     the cell's complete config (what its command runs)
    <out>/cells/<key>/command.sh    the exact command that reproduces the cell alone
    <out>/cells/<key>/status.json   pending/running/done/failed, timings, return code, the error's last lines
    <out>/cells/<key>/log.txt       the cell's stdout and stderr
    <out>/cells/<key>/run/          the run itself: config.yaml, TensorBoard events, checkpoints, eval/*/summary.json

Cells are keyed by their resolved config (``resolve.py``), so identical cells of two experiments run once, a
finished cell is skipped on rerun, and a killed cell resumes from its ``last.ckpt``. A failed cell is recorded and
the others go on. Processes, not threads: each cell is a separate interpreter with its own thread budget, exactly
what a user runs by hand, so nothing in the runner assumes the organism or a device.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from piggy_lightning.experiments.resolve import config_key, resolve_cell
from piggy_lightning.experiments.spec import Grid, GridError

_VERSIONED = ("TensorBoardLogger", "CSVLogger")


@dataclass
class PlannedCell:
    """A cell with its resolved config and where it lives."""

    key: str
    labels: list[str]
    coords: dict[str, dict[str, str]]  # label -> {axis: value}
    config: dict[str, Any]
    directory: Path

    @property
    def status_path(self) -> Path:
        return self.directory / "status.json"

    def status(self) -> dict[str, Any]:
        """The recorded status (``pending`` when the cell never started)."""
        if not self.status_path.is_file():
            return {"status": "pending"}
        return json.loads(self.status_path.read_text())


def _place(config: dict[str, Any], cells_dir: Path, key: str, label: str) -> dict[str, Any]:
    """Point the cell's logger at ``<cells_dir>/<key>/run`` (name and version fixed, so a rerun continues it)."""
    logger = (config.get("trainer") or {}).get("logger")
    if not isinstance(logger, dict) or not str(logger.get("class_path", "")).endswith(_VERSIONED):
        raise GridError(f"{label}: a cell needs trainer.logger to be a TensorBoardLogger or CSVLogger, got {logger!r}")
    args = logger.setdefault("init_args", {})
    args.update({"save_dir": str(cells_dir), "name": key, "version": "run"})
    return config


def plan(grid: Grid, out: Path, root: Path) -> list[PlannedCell]:
    """Resolve every cell of ``grid`` and write ``grid.json`` plus each cell's ``cell.yaml`` and ``command.sh``."""
    cells_dir = out / "cells"
    planned: dict[str, PlannedCell] = {}
    order: list[dict[str, Any]] = []
    for cell in grid.cells():
        config = resolve_cell(cell, root)
        key = config_key(config)[:16]
        entry = planned.get(key)
        if entry is None:
            config = _place(config, cells_dir.resolve(), key, cell.label)
            entry = planned[key] = PlannedCell(key, [], {}, config, cells_dir / key)
        entry.labels.append(cell.label)
        entry.coords[cell.label] = dict(cell.coords)
        order.append({"label": cell.label, "experiment": cell.experiment, "coords": dict(cell.coords), "key": key})
    out.mkdir(parents=True, exist_ok=True)
    experiments = {
        name: {
            "title": e.title,
            "axes": [a.name for a in e.axes],
            "replicate": e.replicate,
            "paper": e.paper,
            "metrics": list(e.metrics),
            "task_vectors": e.task_vectors.as_dict() if e.task_vectors else None,
        }
        for name, e in grid.experiments.items()
    }
    manifest = {"name": grid.name, "grid_file": str(grid.path), "root": str(root.resolve()), "cells": order}
    manifest["experiments"] = experiments
    (out / "grid.json").write_text(json.dumps(manifest, indent=1))
    for entry in planned.values():
        entry.directory.mkdir(parents=True, exist_ok=True)
        (entry.directory / "cell.yaml").write_text(yaml.safe_dump(entry.config, sort_keys=False))
        command = " ".join(shlex.quote(a) for a in _command(entry, root, resume=False))
        (entry.directory / "command.sh").write_text(
            f"#!/usr/bin/env bash\n# {', '.join(entry.labels)}\ncd {shlex.quote(str(root.resolve()))}\n"
            f"OMP_NUM_THREADS={grid.threads_per_cell} {command}\n"
        )
    return list(planned.values())


def _command(cell: PlannedCell, root: Path, resume: bool) -> list[str]:
    main = str((root / "main.py").resolve())
    command = [sys.executable, main, "fit", "--config", str((cell.directory / "cell.yaml").resolve())]
    if resume:
        command += ["--ckpt_path", "last"]
    return command


def _run_one(cell: PlannedCell, root: Path, threads: int) -> dict[str, Any]:
    last = cell.directory / "run" / "checkpoints" / "last.ckpt"
    command = _command(cell, root, resume=last.is_file())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    status: dict[str, Any] = {"status": "running", "labels": cell.labels, "started": started, "command": command}
    cell.status_path.write_text(json.dumps(status, indent=1))
    with open(cell.directory / "log.txt", "a") as log:
        log.write(f"\n$ {' '.join(shlex.quote(a) for a in command)}\n")
        log.flush()
        code = subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    status.update(returncode=code, seconds=round(time.time() - started, 1), finished=time.time())
    if code == 0:
        status["status"] = "done"
    else:
        tail = (cell.directory / "log.txt").read_text(errors="replace").splitlines()[-40:]
        status.update(status="failed", error="\n".join(tail))
    cell.status_path.write_text(json.dumps(status, indent=1))
    return status


def run_grid(grid: Grid, out: Path, root: Path, workers: int | None = None, only: str | list[str] | None = None) -> int:
    """Run every cell not yet done; return the number of failed cells.

    Args:
        grid: The parsed grid.
        out: The grid run directory.
        root: The repository root (cells run there).
        workers: Parallel cells; defaults to the grid's ``workers``.
        only: Run only cells one of whose labels contains this text, or one of these texts (the others stay as
            they are).
    """
    workers = workers or grid.workers
    cores = os.cpu_count() or 1
    if workers * grid.threads_per_cell > cores:
        raise GridError(
            f"{grid.path}: {workers} workers x {grid.threads_per_cell} threads exceed the {cores} CPU cores; "
            "lower `workers` or `threads_per_cell`"
        )
    cells = plan(grid, out, root)
    wanted = [only] if isinstance(only, str) else only
    todo = [
        c
        for c in cells
        if c.status()["status"] != "done" and (wanted is None or any(w in x for w in wanted for x in c.labels))
    ]
    done = len(cells) - len([c for c in cells if c.status()["status"] != "done"])
    print(
        f"grid {grid.name}: {len(cells)} cells, {done} done, {len(todo)} to run, {workers} at a time -> {out}",
        flush=True,
    )
    failed = 0
    # the overall bar on a terminal; in a log file each line carries the count instead
    bar = tqdm(total=len(todo), desc=grid.name, unit="cell", file=sys.stderr, disable=not sys.stderr.isatty())
    finished = 0

    def work(cell: PlannedCell) -> tuple[PlannedCell, dict[str, Any]]:
        more = f" (+{len(cell.labels) - 1} identical)" if cell.labels[1:] else ""
        bar.write(f"start  {cell.key}  {cell.labels[0]}{more}", file=sys.stdout)
        sys.stdout.flush()  # one line per cell, live also when the output is a log file
        return cell, _run_one(cell, root, grid.threads_per_cell)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(work, cell) for cell in todo]):
            cell, status = future.result()
            finished += 1
            last_line = (status.get("error") or "").strip().splitlines()[-1:] or [""]
            bar.write(
                file=sys.stdout,
                s=f"{status['status']:6} {cell.key}  {cell.labels[0]}  {status['seconds']:.0f} s"
                f"  [{finished}/{len(todo)}]"
                + (
                    f"  -> {last_line[0][:160]} (see {cell.directory / 'log.txt'})"
                    if status["status"] != "done"
                    else ""
                ),
            )
            sys.stdout.flush()
            failed += status["status"] != "done"
            bar.update(1)
    bar.close()
    print(f"grid {grid.name}: {len(todo) - failed} cells finished, {failed} failed", flush=True)
    return failed
