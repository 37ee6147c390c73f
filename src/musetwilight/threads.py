"""How many IFUs a run reduces at once by default, as ESO's OpenMP team is sized.

ESO's muse_twilight runs its per-IFU loop in an OpenMP team (libgomp): ``OMP_NUM_THREADS``
sets its size when it holds a positive number (the first of a nested list such as
``4,2``; anything else is ignored, as libgomp ignores it), otherwise the CPUs of the
process's affinity mask (what ``taskset`` or ``likwid-pin`` leave it), not all CPUs of
the machine.  musetwilight never uses more than one worker per IFU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .instrument import NUM_IFUS


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def omp_num_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """The team size OMP_NUM_THREADS asks for, or None when unset or not a positive number."""
    text = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    first = text.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def default_workers(environ: Mapping[str, str] | None = None) -> int:
    """Workers of a run: OMP_NUM_THREADS, else the affinity CPUs; at most one per IFU."""
    return min(NUM_IFUS, omp_num_threads(environ) or affinity_cpus())
