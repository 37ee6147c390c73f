"""Pixel grid: the pixel-table rows sorted into the cells of the output cube.

As in ESO's muse_pixgrid, every row goes into the cell nearest to it
(``lround`` of its grid coordinate, rows outside the grid clamped to the edge
cells), and rows keep their table order inside a cell.  Here the grid is a
compressed-sparse-row structure built by a stable counting sort: the columns
are copied in cell order so that the kernels read contiguous memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from numba import njit

from .cube import CubeGrid


@dataclass
class PixGrid:
    """Pixel-table columns in cell order.

    Cell ``c = i + nx * (j + ny * l)`` holds the sorted rows
    ``offsets[c]:offsets[c + 1]``; ``order`` maps them back to table rows.
    """

    nx: int
    ny: int
    nz: int
    offsets: np.ndarray  # int64, nx*ny*nz + 1
    order: np.ndarray  # int32 (int64 for huge tables), table row of each sorted entry
    xpos: np.ndarray  # float32 columns, sorted
    ypos: np.ndarray
    lbda: np.ndarray
    data: np.ndarray
    stat: np.ndarray
    dq: np.ndarray  # uint32

    @property
    def max_count(self) -> int:
        """Largest number of rows in one cell."""
        return int(np.max(np.diff(self.offsets))) if len(self.offsets) > 1 else 0


@njit(cache=True, nogil=True, inline="always")
def lround_nb(value):
    """C ``lround`` (half away from zero) for a float64."""
    truncated = np.trunc(value)
    if abs(value - truncated) >= 0.5:
        truncated += 1.0 if value > 0 else -1.0
    return np.int64(truncated)


def build_pixgrid(grid: CubeGrid, xpos, ypos, lambda_, data, stat, dq) -> PixGrid:
    """Sort the pixel-table rows into the cells of ``grid``."""
    table = SimpleNamespace(xpos=xpos, ypos=ypos, lambda_=lambda_, data=data, stat=stat, dq=dq)
    return build_pixgrid_from_tables(grid, [(table, 1.0)])


@njit(cache=True, nogil=True, error_model="numpy")
def _tile_cells(xpos, ypos, lbda, crval1, crval2, crval3, cd3, nx, ny, nz, first, last, cells):
    """Cells of the rows in the grid rows first..last (numbered within them), -1 for the others.

    The grid cell is found as in the whole grid (rows outside it clamped to the edge cells)."""
    nyt = last - first + 1
    for row in range(len(xpos)):
        i = lround_nb((np.float64(xpos[row]) - crval1) + 1.0) - 1
        j = lround_nb((np.float64(ypos[row]) - crval2) + 1.0) - 1
        l = lround_nb((np.float64(lbda[row]) - crval3) / cd3 + 1.0) - 1
        i = min(max(i, 0), nx - 1)
        j = min(max(j, 0), ny - 1)
        l = min(max(l, 0), nz - 1)
        cells[row] = i + nx * ((j - first) + nyt * l) if first <= j <= last else -1


@njit(cache=True, nogil=True)
def _count_cells(cells, counts):
    for row in range(len(cells)):
        c = cells[row]
        if c >= 0:
            counts[c] += 1


@njit(cache=True, nogil=True)
def _scatter_rows(cells, fill, first_row, xpos, ypos, lbda, data, stat, dq, divisor,
                  sx, sy, sl, sd, ss, sq, order):
    """Append one table's rows to their cells (stable; cells < 0 skipped), dividing data by
    ``divisor`` (stat by its square)."""
    scale = divisor != 1.0
    divisor2 = divisor * divisor
    for row in range(len(cells)):
        c = cells[row]
        if c < 0:
            continue
        k = fill[c]
        fill[c] = k + 1
        order[k] = first_row + row
        sx[k] = xpos[row]
        sy[k] = ypos[row]
        sl[k] = lbda[row]
        if scale:  # in double precision, as CPL's cpl_table_divide_scalar on a float column
            sd[k] = np.float32(np.float64(data[row]) / divisor)
            ss[k] = np.float32(np.float64(stat[row]) / divisor2)
        else:
            sd[k] = data[row]
            ss[k] = stat[row]
        sq[k] = dq[row]


def build_pixgrid_from_tables(grid: CubeGrid, parts: list, first: int = 0, last: int | None = None,
                              threads: int = 1) -> PixGrid:
    """Sort the rows of several pixel tables, in list order, into the cells of the grid rows
    ``first..last`` (default: all) of ``grid``.

    ``parts`` are ``(table, divisor)`` pairs (a table has xpos, ypos, lambda_, data, stat,
    dq); the result equals :func:`build_pixgrid` on the concatenated tables after dividing
    each by its divisor (the per-IFU flux scaling), restricted to those grid rows, without
    ever holding the merged table.  ``threads`` share the rows in consecutive runs: each
    counts its runs' cells, then fills them from where the runs before it end, so every row
    lands where the serial sort puts it.
    """
    last = grid.ny - 1 if last is None else last
    nyt = last - first + 1
    ncell = grid.nx * nyt * grid.nz
    small = np.int32 if ncell < 2**31 else np.int64
    limits = (float(grid.crval1), float(grid.crval2), float(grid.crval3), float(grid.cd3),
              grid.nx, grid.ny, grid.nz, first, last)
    tables = []
    for table, divisor in parts:
        arrays = [np.ascontiguousarray(getattr(table, name), np.float32)
                  for name in ("xpos", "ypos", "lambda_", "data", "stat")]
        arrays.append(np.ascontiguousarray(table.dq).astype(np.uint32, copy=False))
        tables.append((arrays, float(divisor)))
    runs = _split_rows([len(arrays[0]) for arrays, _ in tables], max(1, threads))

    def count(pieces: list[tuple[int, int, int, int]]) -> tuple[list[np.ndarray], np.ndarray]:
        counts = np.zeros(ncell, np.int64)
        cells = []
        for k, lo, hi, _ in pieces:
            x, y, lam = (column[lo:hi] for column in tables[k][0][:3])
            piece = np.empty(hi - lo, small)
            _tile_cells(x, y, lam, *limits, piece)
            _count_cells(piece, counts)
            cells.append(piece)
        return cells, counts

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        counted = list(pool.map(count, runs))
        offsets = np.zeros(ncell + 1, np.int64)
        np.cumsum(sum(counts for _, counts in counted), out=offsets[1:])
        total = int(offsets[-1])
        sx, sy, sl, sd, ss = (np.empty(total, np.float32) for _ in range(5))
        sq = np.empty(total, np.uint32)
        order = np.empty(total, np.int32 if total < 2**31 else np.int64)
        starts, fill = [], offsets[:-1].copy()
        for _, counts in counted:
            starts.append(fill.copy())
            fill += counts

        def scatter(number: int) -> None:
            fill = starts[number]
            for cells, (k, lo, hi, first_row) in zip(counted[number][0], runs[number]):
                x, y, lam, data, stat, dq = (column[lo:hi] for column in tables[k][0])
                _scatter_rows(cells, fill, first_row, x, y, lam, data, stat, dq, tables[k][1],
                              sx, sy, sl, sd, ss, sq, order)

        list(pool.map(scatter, range(len(runs))))
    return PixGrid(grid.nx, nyt, grid.nz, offsets, order, sx, sy, sl, sd, ss, sq)


def _split_rows(sizes: list[int], runs: int) -> list[list[tuple[int, int, int, int]]]:
    """The rows of tables of ``sizes``, in order, cut into ``runs`` consecutive runs of about
    equal length: per run its pieces (table, first row, end row, row number in the whole)."""
    total = sum(sizes)
    bounds = [total * number // runs for number in range(runs + 1)]
    pieces: list[list[tuple[int, int, int, int]]] = [[] for _ in range(runs)]
    start = 0
    for k, size in enumerate(sizes):
        for number in range(runs):
            lo, hi = max(bounds[number], start), min(bounds[number + 1], start + size)
            if lo < hi:
                pieces[number].append((k, lo - start, hi - start, lo))
        start += size
    return [run for run in pieces if run] or [[]]
