"""Entry point: ``python main.py fit --config configs/treft_legal.yaml`` (see README.md).

Importing the subpackages registers their classes, so short names also work on the command line, e.g.
``--data LegalDataModule`` or ``--trainer.callbacks+=KVDriftMonitor``; committed YAMLs use full class paths.

``python main.py grid run GRID_FILE`` runs an experiment grid (``piggy_lightning/experiments``): many ``fit`` runs,
in parallel processes, resumable, with a report.

Rerunning the same ``fit`` command continues its run (same ``version_N``, its ``last.ckpt``, its evaluation files and
judge cache); any other config starts a new ``version_N`` (see ``piggy_lightning/cli.py``).
"""

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["grid"]:
    from piggy_lightning.experiments.cli import main as grid_main

    sys.exit(grid_main(sys.argv[2:]))

import piggy_lightning.callbacks  # noqa: F401
import piggy_lightning.data  # noqa: F401
import piggy_lightning.evaluation  # noqa: F401
import piggy_lightning.organism  # noqa: F401
import piggy_lightning.regularizers  # noqa: F401
from piggy_lightning.cli import PiggyCLI

if __name__ == "__main__":
    PiggyCLI()
