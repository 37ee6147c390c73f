"""First-run benchmark: a fresh install's first mini reduction, from a cold Numba cache.

The first run on a machine compiles the Numba kernels it needs (cached afterwards).  This
script simulates a mini set, then times ``musetwilight run`` on it in a new process with an
empty Numba cache (``NUMBA_CACHE_DIR`` pointed at a new directory), and again with that
cache filled, and cold once more without the second compiling process (``musetwilight.precompile``,
switched off by $MUSETWILIGHT_NO_PRECOMPILE) for comparison.  Goal (issue 16): the cold run within
10 s wall on the project's 2-core machine.

    python benchmarks/bench_first_run.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from musetwilight.tools.simulate import simulate_dataset


def timed_run(sof: Path, out: Path, cache: Path, precompile: bool = True) -> float:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    env.pop("MUSETWILIGHT_NO_PRECOMPILE", None)
    if not precompile:
        env["MUSETWILIGHT_NO_PRECOMPILE"] = "1"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "musetwilight", "-q", "run", f"--output-dir={out}", str(sof)],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_first_run_"))
    sof = simulate_dataset(work / "set", scale="mini", seed=1).sof
    cold, warm, alone = [], [], []
    for number in range(args.runs):
        cache = work / f"numba{number}"
        cold.append(timed_run(sof, work / f"cold{number}", cache))
        warm.append(timed_run(sof, work / f"warm{number}", cache))
        alone.append(timed_run(sof, work / f"alone{number}", work / f"numba-alone{number}", precompile=False))
    print(f"mini set, {args.runs} runs: cold Numba cache min/median/max {min(cold):.1f}/"
          f"{statistics.median(cold):.1f}/{max(cold):.1f} s; warm {min(warm):.1f}/{statistics.median(warm):.1f}/"
          f"{max(warm):.1f} s; compilation about {statistics.median(cold) - statistics.median(warm):.1f} s")
    print(f"cold without the second compiling process: {min(alone):.1f}/{statistics.median(alone):.1f}/"
          f"{max(alone):.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
