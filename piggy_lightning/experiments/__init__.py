"""Experiment grids: many ordinary runs from one file, resumable, in parallel, with a report.

``python main.py grid run configs/experiments/<grid>.yaml`` runs the cells; ``python main.py grid report RUN_DIR``
rebuilds the report. See :mod:`piggy_lightning.experiments.spec` for the file format.
"""

from piggy_lightning.experiments.spec import Axis, Cell, Comparison, Experiment, Grid, GridError, Variant, load_grid

__all__ = ["Axis", "Cell", "Comparison", "Experiment", "Grid", "GridError", "Variant", "load_grid"]
