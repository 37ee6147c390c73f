"""Memory of a run: how much it may use, how much each way of running it needs, and the plan that fits.

Before any work :func:`plan_run` estimates, from the inputs' headers and calibration tables
only, the peak resident memory of the three stages that hold large arrays (the IFU stage:
the exposures of the IFUs being reduced; resampling: the IFU tables it reads and the pixel
grid of one tile of cube rows; smoothing: the cube and its model), and compares them with
the memory this process may use (:func:`memory_budget`: an explicit cap, the cgroup, the
address-space and data limits, a Dask worker's memory limit, the memory available on the
machine; the smallest wins).  It then chooses the IFUs reduced at once, whether the IFU
tables wait on disk (the low-memory path) and the tile size, keeping as much of what was
asked as fits; when even one IFU at a time with the smallest tile cannot fit, the run is
refused at once with the memory it needs (:class:`~musetwilight.errors.MemoryLimitError`),
never killed after minutes.  The choices change how the products are computed, never what
they are (bit-identical whatever the plan: tests/test_determinism.py, tests/test_memory.py).

The per-pixel figures are bytes of the arrays the stages hold (float32 data and variance,
uint32 quality), with the temporaries measured on full-size sets (benchmarks/bench_memory.py
records the estimates against the measured peaks).
"""

from __future__ import annotations

import math
import re
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import MemoryLimitError, ParameterError
from .io import formats, space
from .io.frames import Inputs
from .measure import kb_fields, status_bytes
from .params import Settings

MEMORY_ENV = "MUSETWILIGHT_MAX_MEMORY"
EXPOSURE_BYTES_PER_PIXEL = 12  # a processed exposure: data, stat (float32), dq (uint32)
CALIBRATION_BYTES_PER_PIXEL = 22  # the calibration being applied (12) and the reading of the next image (10)
PIXTABLE_BYTES_PER_PIXEL = 36  # the combined image (12), the table being built (24 per row) and its temporaries
RESAMPLE_BYTES_PER_ROW = 90  # the pixel grid of a tile: the rows' columns, cell order and offsets, flags
TABLES_HELD = 3  # low-memory path: IFU tables loaded at once (the current tile's and the next one's)
CUBE_BYTES_PER_VOXEL = 24  # data, stat, dq while resampling; the products and the model while smoothing
MIN_ROWS_PER_TILE = 500_000
MARGIN = 1.10  # asked for beyond an estimate
DASK_TERMINATE = 0.95  # fraction of its memory limit at which a Dask nanny kills its worker (Dask's default)
_UNLIMITED = 1 << 60


# --------------------------------------------------------------------------- what this process may use


@dataclass(frozen=True)
class MemoryBudget:
    """The most resident memory this process may reach, in bytes, and what sets it."""

    limit: int
    source: str

    def __str__(self) -> str:
        return f"{space.format_bytes(self.limit)} ({self.source})"


def parse_size(text: str | int | float) -> int:
    """A memory size: bytes, or a number with k/M/G/T (powers of 1000) or KiB/MiB/GiB/TiB (of 1024),
    "B" optional, as Dask's --memory-limit ("16GB", "1.5GiB", "800M")."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        number, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
        if not match:
            raise ParameterError(f"memory size '{text}': expected a number of bytes with an optional unit "
                                 "(k, M, G, T or KiB, MiB, GiB, TiB), e.g. 4G")
        number, unit = float(match.group(1)), match.group(2).upper()
        if match.group(3) and not unit:
            raise ParameterError(f"memory size '{text}': 'i' needs a unit (KiB, MiB, GiB, TiB)")
        base = 1024 if match.group(3) else 1000
        number *= base ** " KMGT".index(unit or " ")
    if not math.isfinite(number) or number <= 0:
        raise ParameterError(f"memory size '{text}' must be positive")
    return int(number)


def process_memory() -> dict[str, int]:
    """This process's resident, virtual and data-segment sizes in bytes (Linux /proc; {} elsewhere)."""
    found = status_bytes("VmRSS", "VmSize", "VmData")
    return {name: found[field] for name, field in (("rss", "VmRSS"), ("vsize", "VmSize"), ("data", "VmData"))
            if field in found}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return None


def cgroup_budget(own_rss: int, proc: Path = Path("/proc/self/cgroup"),
                  root: Path = Path("/sys/fs/cgroup")) -> MemoryBudget | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)
    less what the rest of the cgroup holds (its anonymous memory beyond ours; page cache is
    reclaimed before the limit bites); None without a limit."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.lstrip("/")
        if number == "0" and controllers == "":  # cgroup v2
            directory = root / relative
            while True:
                limit = _read_int(directory / "memory.max")
                if limit is not None:
                    anon = _stat_value(directory / "memory.stat", "anon") or 0
                    return MemoryBudget(max(0, limit - max(0, anon - own_rss)), f"cgroup memory.max of {directory}")
                if directory == root or root not in directory.parents:
                    break
                directory = directory.parent
        elif "memory" in controllers.split(","):  # cgroup v1
            directory = root / "memory" / relative
            limit = _read_int(directory / "memory.limit_in_bytes")
            if limit is not None and limit < _UNLIMITED:
                anon = _stat_value(directory / "memory.stat", "total_rss") or 0
                return MemoryBudget(max(0, limit - max(0, anon - own_rss)),
                                    f"cgroup memory.limit_in_bytes of {directory}")
    return None


def rlimit_budgets(usage: Mapping[str, int]) -> list[MemoryBudget]:
    """The address-space (``ulimit -v``) and data-segment (``ulimit -d``) limits, as the resident
    memory they still allow (today's resident size plus the room left under each limit)."""
    found = []
    rss = usage.get("rss", 0)
    for name, what, key in ((resource.RLIMIT_AS, "address-space limit (ulimit -v)", "vsize"),
                            (resource.RLIMIT_DATA, "data-segment limit (ulimit -d)", "data")):
        soft = resource.getrlimit(name)[0]
        if soft != resource.RLIM_INFINITY and key in usage:
            found.append(MemoryBudget(max(0, rss + soft - usage[key]), what))
    return found


def dask_worker_budget() -> MemoryBudget | None:
    """Within a Dask worker with a memory limit: the share its nanny lets it reach before killing it."""
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return None
    manager = getattr(worker, "memory_manager", None)
    limit = getattr(manager, "memory_limit", None) or getattr(worker, "memory_limit", None)
    if not limit:
        return None
    return MemoryBudget(int(limit * DASK_TERMINATE), f"Dask worker {worker.address} memory limit")


def available_budget(own_rss: int, meminfo: Path = Path("/proc/meminfo")) -> MemoryBudget | None:
    """The memory this machine has available (MemAvailable, swap left aside), plus what we hold."""
    try:
        available = kb_fields(meminfo.read_text(), "MemAvailable").get("MemAvailable")
    except OSError:
        return None
    return None if available is None else MemoryBudget(own_rss + available, "memory available on this machine")


def memory_budget(cap: int | None = None, environ: Mapping[str, str] | None = None) -> MemoryBudget | None:
    """The smallest of: ``cap`` (--max-memory), $MUSETWILIGHT_MAX_MEMORY, the cgroup's limit,
    the address-space and data limits, a Dask worker's limit, the memory available; None
    where none is known."""
    usage = process_memory()
    rss = usage.get("rss", 0)
    found: list[MemoryBudget] = []
    if cap is not None:
        found.append(MemoryBudget(cap, "--max-memory"))
    elif environ and environ.get(MEMORY_ENV):
        found.append(MemoryBudget(parse_size(environ[MEMORY_ENV]), f"${MEMORY_ENV}"))
    for budget in (cgroup_budget(rss), *rlimit_budgets(usage), dask_worker_budget(), available_budget(rss)):
        if budget is not None:
            found.append(budget)
    return min(found, key=lambda b: b.limit) if found else None


# --------------------------------------------------------------------------- what a run needs


@dataclass(frozen=True)
class MemoryNeeds:
    """What the estimates are made of: the largest CCD's pixels, the exposures per IFU, each
    IFU's table rows, the cube's voxels and this process's resident size before the run."""

    pixels: int
    exposures: int
    table_rows: tuple[int, ...]
    cube_voxels: int
    base: int

    def worker(self) -> int:
        """Peak of one IFU being reduced: its exposures and a calibration, or the table being built."""
        per_pixel = max(EXPOSURE_BYTES_PER_PIXEL * self.exposures + CALIBRATION_BYTES_PER_PIXEL,
                        PIXTABLE_BYTES_PER_PIXEL)
        return self.pixels * per_pixel

    def largest_table(self) -> int:
        return space.table_bytes(max(self.table_rows, default=0))

    def ifu_stage(self, workers: int, low_memory: bool) -> int:
        """``workers`` IFUs in flight; the finished tables held in memory, or the one going to disk."""
        held = space.table_bytes(sum(self.table_rows)) if not low_memory else self.largest_table()
        return self.base + min(workers, max(1, len(self.table_rows))) * self.worker() + held

    def resample_stage(self, rows_per_tile: int | None) -> int:
        """All tables and one pixel grid of them (None), or the tables of a tile and its grid."""
        cube = self.cube_voxels * 12
        if rows_per_tile is None:
            rows = sum(self.table_rows)
            return self.base + space.table_bytes(rows) + rows * RESAMPLE_BYTES_PER_ROW + cube
        held = min(TABLES_HELD, len(self.table_rows)) * self.largest_table()
        return self.base + held + min(rows_per_tile, sum(self.table_rows)) * RESAMPLE_BYTES_PER_ROW + cube

    def smooth_stage(self) -> int:
        return self.base + self.cube_voxels * CUBE_BYTES_PER_VOXEL


def run_needs(inputs: Inputs, settings: Settings, ifus: Sequence[int], base: int) -> MemoryNeeds:
    """The estimates' ingredients for the IFUs of a set, from headers and calibration tables only."""
    headers = formats.scan_fits(inputs.skyflats[0])
    shapes = [space.ccd_shape(headers, ifu) for ifu in ifus] or [(0, 0)]
    rows = space.ifu_rows(inputs, settings, ifus)
    planes, ny, nx = space.cube_shape(inputs, settings, ifus) if ifus else (0, 0, 0)
    return MemoryNeeds(pixels=max(r * c for r, c in shapes), exposures=len(inputs.used_raw()),
                       table_rows=tuple(n for n in rows.values() if n), cube_voxels=planes * ny * nx, base=base)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    """How the run proceeds: IFUs reduced at once, IFU tables on disk (low-memory path), rows
    per resampling tile (None: all at once), the peak estimated and the budget it fits."""

    workers: int
    low_memory: bool
    rows_per_tile: int | None
    estimate: int
    budget: MemoryBudget | None

    def as_dict(self) -> dict:
        """The plan as plain values (MiB), for --timings-json and the benchmarks."""
        return {"workers": self.workers, "low_memory": self.low_memory, "rows_per_tile": self.rows_per_tile,
                "estimate_mb": round(self.estimate / 2**20, 1),
                "budget_mb": round(self.budget.limit / 2**20, 1) if self.budget else None,
                "budget_source": self.budget.source if self.budget else None}

    def describe(self) -> str:
        if not self.low_memory:
            path = "tables in memory"
        elif self.rows_per_tile is None:
            path = "low-memory path"
        else:
            path = f"low-memory path, tiles of {self.rows_per_tile / 1e6:.3g} M rows"
        limit = f", may use {self.budget}" if self.budget is not None else ""
        return (f"{self.workers} IFU{'s' if self.workers != 1 else ''} at a time, {path}; "
                f"peak estimated at {space.format_bytes(self.estimate)}{limit}")


def plan_memory(needs: MemoryNeeds, budget: MemoryBudget | None, workers: int, low_memory: bool,
                rows_per_tile: int, flexible_path: bool = False) -> MemoryPlan:
    """Keep what was asked (``workers``, ``low_memory``, ``rows_per_tile``) as far as it fits into
    ``budget``: fewer IFUs at once, smaller tiles and (``flexible_path``: the path was not
    asked for) the low-memory path; MemoryLimitError when nothing fits."""
    def fits(estimate: int) -> bool:
        return budget is None or estimate * MARGIN <= budget.limit

    paths = [low_memory] + ([True] if flexible_path and not low_memory else [])
    for low in paths:
        chosen = next((w for w in range(max(1, workers), 0, -1) if fits(needs.ifu_stage(w, low))), None)
        if chosen is None:
            continue
        tile: int | None = None
        if low:
            tile = rows_per_tile
            while not fits(needs.resample_stage(tile)) and tile // 2 >= MIN_ROWS_PER_TILE:
                tile //= 2
        estimates = (needs.ifu_stage(chosen, low), needs.resample_stage(tile), needs.smooth_stage())
        if all(fits(e) for e in estimates):
            return MemoryPlan(chosen, low, tile, max(estimates), budget)
    least = max(needs.ifu_stage(1, True), needs.resample_stage(MIN_ROWS_PER_TILE), needs.smooth_stage())
    assert budget is not None  # an unknown budget always fits
    raise MemoryLimitError(f"not enough memory for this set: about {space.format_bytes(least * MARGIN)} needed "
                           f"even reducing one IFU at a time with the IFU tables on disk, "
                           f"{space.format_bytes(budget.limit)} available ({budget.source})")
