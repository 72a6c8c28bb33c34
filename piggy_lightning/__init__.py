"""piggy_lightning: study and mitigate emergent misalignment with PyTorch Lightning.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` when the variable is unset, before torch starts OpenMP:
with the default active policy, waiting OpenMP threads spin, and on a 2-core machine shared with other work the
main job then took up to 5-10x longer (``benchmarks/thread_policy.py`` measures it; see the README). Set the
variable yourself to override this; it has no effect when torch was imported before this package.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from piggy_lightning.module import PiggyModule  # noqa: E402

__all__ = ["PiggyModule"]
