"""Which CPU thread policy to run with: the main job under torch thread counts and OpenMP wait policies.

Each round runs the main job once per setting, in an order rotated from round to round (so a burst of load from
other work does not land on one setting only), in a fresh process so that the environment variables take effect
before OpenMP starts. It reports, per setting, the median and range of wall time and of CPU time (user + system of
the child), and the machine's load average before the first round. ``--load N`` adds N busy-looping processes for
the duration, to measure a loaded machine on purpose.

To run: ``python benchmarks/thread_policy.py --rounds 3`` (about 4 minutes), and ``--load 1`` for the loaded case.
The package sets ``OMP_WAIT_POLICY=PASSIVE`` when it is unset and other processes keep the machine busy
(``piggy_lightning/__init__.py``, chosen from this benchmark's idle and loaded runs); set the variable to override.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> environment
    "threads2_active": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "threads2_passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}


def _burn() -> None:
    while True:
        pass


def run_once(env: dict[str, str], out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one main job in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cmd = [sys.executable, "main.py", "fit", "--config", "configs/treft_legal.yaml",
           "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes to run alongside")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    names = list(SETTINGS)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    try:
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                with tempfile.TemporaryDirectory() as out:
                    times[name].append(run_once(SETTINGS[name], Path(out)))
    finally:
        for b in burners:
            b.terminate()
    result = {"load_average_before": round(load_before, 2), "extra_load": args.load, "rounds": args.rounds}
    for name, runs in times.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        result[name] = {
            "wall_median": round(statistics.median(walls), 2),
            "wall_range": [round(min(walls), 2), round(max(walls), 2)],
            "cpu_median": round(statistics.median(cpus), 2),
            "cpu_range": [round(min(cpus), 2), round(max(cpus), 2)],
        }
        print(f"{name:<18} wall {result[name]['wall_median']:>6.2f} s {result[name]['wall_range']}  "
              f"cpu {result[name]['cpu_median']:>6.2f} s {result[name]['cpu_range']}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
