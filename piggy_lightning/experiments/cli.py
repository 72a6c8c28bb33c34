"""``python main.py grid {run,report,list} ...``: the experiment grid's command line.

A separate subcommand group beside LightningCLI's ``fit``/``test``: a grid is not one trainer call but many, each
an ordinary ``main.py fit`` in its own process, so it cannot be a LightningCLI subcommand (those are trainer
methods). The grid file format is documented in ``piggy_lightning/experiments/spec.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from piggy_lightning.experiments.report import export_run, load_run, write_report
from piggy_lightning.experiments.runner import plan, run_grid
from piggy_lightning.experiments.spec import GridError, load_grid


def _out(grid_name: str, out: str | None) -> Path:
    return Path(out) if out else Path("runs") / "grid" / grid_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="main.py grid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every cell not yet done, then write the report")
    run.add_argument("grid_file")
    run.add_argument("--out", help="grid run directory (default runs/grid/<name>)")
    run.add_argument("--workers", type=int, help="parallel cells (default: the grid file's `workers`)")
    run.add_argument(
        "--only", action="append", help="run only the cells whose label contains this text (repeatable: any of them)"
    )
    listing = sub.add_parser("list", help="expand the grid and show every cell, its key and status")
    listing.add_argument("grid_file")
    listing.add_argument("--out")
    report = sub.add_parser("report", help="write <run dir>/report.md from the finished cells")
    report.add_argument("run_dir")
    report.add_argument("--grid_file", help="grid file whose comparisons to add (default: the one it ran)")
    report.add_argument("--report", help="where to write the report (default <run dir>/report.md)")
    export = sub.add_parser("export", help="copy a run's summaries, statuses and cell configs (no checkpoints) to DEST")
    export.add_argument("run_dir")
    export.add_argument("dest")
    export.add_argument("--report", help="where to write the report (default <dest>/report.md)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        if args.command == "export":
            dest = export_run(Path(args.run_dir), Path(args.dest))
            manifest, _, _ = load_run(dest)
            comparisons = load_grid(manifest["grid_file"], root).comparisons
            print(write_report(dest, comparisons, Path(args.report) if args.report else None))
            return 0
        if args.command == "report":
            out = Path(args.run_dir)
            manifest, _, _ = load_run(out)
            comparisons = load_grid(args.grid_file or manifest["grid_file"], root).comparisons
            print(write_report(out, comparisons, Path(args.report) if args.report else None))
            return 0
        grid = load_grid(args.grid_file, root)
        out = _out(grid.name, args.out)
        if args.command == "list":
            for cell in plan(grid, out, root):
                print(f"{cell.status()['status']:8} {cell.key}  {'  '.join(cell.labels)}")
            return 0
        failed = run_grid(grid, out, root, args.workers, args.only)
        print(write_report(out, grid.comparisons))
        return 1 if failed else 0
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
