"""piggy_lightning: study and mitigate emergent misalignment with PyTorch Lightning.

Importing the package chooses OpenMP's wait policy before torch starts OpenMP, unless ``OMP_WAIT_POLICY`` is
already set (set it yourself to override; it has no effect when torch was imported before this package). Measured
on the 2-core machine with ``benchmarks/thread_policy.py`` (main job, 2 threads): on an idle machine the default
ACTIVE policy is fastest (11.1 s wall against 14.3 s with PASSIVE), while with one other busy process waiting
threads spin against it (21.7 s ACTIVE against 14.1 s PASSIVE). So PASSIVE is set only when other processes keep
at least half a core busy, sampled from ``/proc/stat`` for 0.1 s at import (the load average would also count this
project's own previous runs, so a second run in a row would be slowed for nothing).
"""

import os
import time


def wait_policy(busy_cores: float) -> str | None:
    """The OpenMP wait policy to set when other processes keep ``busy_cores`` cores busy (None: the default)."""
    return "PASSIVE" if busy_cores >= 0.5 else None


def busy_cores(interval: float = 0.1) -> float | None:
    """How many cores other processes keep busy, from ``/proc/stat`` over ``interval`` seconds (this process sleeps
    meanwhile); None where ``/proc/stat`` cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (busy1 - busy0) / max(total1 - total0, 1)


if "OMP_WAIT_POLICY" not in os.environ:
    _busy = busy_cores()
    if _busy is not None and (_policy := wait_policy(_busy)) is not None:
        os.environ["OMP_WAIT_POLICY"] = _policy

__all__ = ["PiggyModule", "busy_cores", "wait_policy"]


def __getattr__(name: str):
    """``piggy_lightning.PiggyModule``, imported on first use: importing the package (which every subpackage import
    does first) then costs no Lightning import (about 5 s of CPU on the 2-core machine), e.g. for ``main.py grid``,
    the organism's generators and the judges."""
    if name == "PiggyModule":
        from piggy_lightning.module import PiggyModule

        return PiggyModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
