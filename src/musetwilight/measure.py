"""Wall time, CPU time and peak memory of the stages of a run.

The peak resident memory of a stage is the process's high-water mark (VmHWM) reset at the
stage's start (Linux ``/proc/self/clear_refs``); where that is not available it is the
process's peak so far (``getrusage``).
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def kb_fields(text: str, *fields: str) -> dict[str, int]:
    """The "Name:  N kB" lines of a /proc file (status, meminfo) among ``fields``, in bytes."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if name in fields and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            found[name] = int(parts[0]) * 1024
    return found


def status_bytes(*fields: str) -> dict[str, int]:
    """Sizes of this process from /proc/self/status (e.g. VmRSS, VmHWM), in bytes; {} elsewhere."""
    try:
        return kb_fields(_STATUS.read_text(), *fields)
    except OSError:
        return {}


def peak_rss_mb() -> float:
    """The process's peak resident memory (MiB) since the last reset (or since it started)."""
    peak = status_bytes("VmHWM").get("VmHWM")
    if peak is not None:
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StageClock:
    """Per stage: wall seconds, CPU seconds (all threads) and peak resident memory (MiB)."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
            self.peak_rss_mb[name] = max(self.peak_rss_mb.get(name, 0.0), peak_rss_mb())

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"wall_s": round(self.wall[name], 3), "cpu_s": round(self.cpu[name], 3),
                       "peak_rss_mb": round(self.peak_rss_mb[name], 1)} for name in self.wall}
