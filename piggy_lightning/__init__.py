"""piggy_lightning: study and mitigate emergent misalignment with PyTorch Lightning.

Importing the package chooses OpenMP's wait policy before torch starts OpenMP, unless ``OMP_WAIT_POLICY`` is
already set (set it yourself to override; it has no effect when torch was imported before this package). Measured
on the 2-core machine with ``benchmarks/thread_policy.py`` (main job, 2 threads): on an idle machine the default
ACTIVE policy is fastest (11.1 s wall against 14.3 s with PASSIVE), while with one other busy process waiting
threads spin against it (21.7 s ACTIVE against 14.1 s PASSIVE). So PASSIVE is set only when the machine is busy:
when the 1-minute load average is at least a quarter of the cores.
"""

import os


def wait_policy(load: float, cores: int) -> str | None:
    """The OpenMP wait policy to set for a machine with this load average and core count (None: the default)."""
    return "PASSIVE" if load >= 0.25 * max(cores, 1) else None


if "OMP_WAIT_POLICY" not in os.environ:
    try:
        _policy = wait_policy(os.getloadavg()[0], os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        _policy = None
    if _policy is not None:
        os.environ["OMP_WAIT_POLICY"] = _policy

from piggy_lightning.module import PiggyModule  # noqa: E402

__all__ = ["PiggyModule", "wait_policy"]
