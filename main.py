"""Entry point: ``python main.py fit --config configs/treft_legal.yaml`` (see README.md)."""

import piggy_lightning  # noqa: F401  (imports the packages so short class names resolve on the command line)
from piggy_lightning.cli import PiggyCLI

if __name__ == "__main__":
    PiggyCLI()
