"""Pixel grid: the pixel-table rows sorted into the cells of the output cube.

As in ESO's muse_pixgrid, every row goes into the cell nearest to it
(``lround`` of its grid coordinate, rows outside the grid clamped to the edge
cells), and rows keep their table order inside a cell.  Here the grid is a
compressed-sparse-row structure built by a stable counting sort: the columns
are copied in cell order so that the kernels read contiguous memory.
"""

from __future__ import annotations

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


def build_pixgrid_from_tables(grid: CubeGrid, parts: list, first: int = 0, last: int | None = None) -> PixGrid:
    """Sort the rows of several pixel tables, in list order, into the cells of the grid rows
    ``first..last`` (default: all) of ``grid``.

    ``parts`` are ``(table, divisor)`` pairs (a table has xpos, ypos, lambda_, data, stat,
    dq); the result equals :func:`build_pixgrid` on the concatenated tables after dividing
    each by its divisor (the per-IFU flux scaling), restricted to those grid rows, without
    ever holding the merged table.
    """
    last = grid.ny - 1 if last is None else last
    nyt = last - first + 1
    ncell = grid.nx * nyt * grid.nz
    small = np.int32 if ncell < 2**31 else np.int64
    limits = (float(grid.crval1), float(grid.crval2), float(grid.crval3), float(grid.cd3),
              grid.nx, grid.ny, grid.nz, first, last)
    columns = []
    counts = np.zeros(ncell, np.int64)
    for table, divisor in parts:
        arrays = [np.ascontiguousarray(getattr(table, name), np.float32)
                  for name in ("xpos", "ypos", "lambda_", "data", "stat")]
        arrays.append(np.ascontiguousarray(table.dq).astype(np.uint32, copy=False))
        cells = np.empty(len(arrays[0]), small)
        _tile_cells(arrays[0], arrays[1], arrays[2], *limits, cells)
        _count_cells(cells, counts)
        columns.append((cells, arrays, divisor))
    offsets = np.zeros(ncell + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    del counts
    total = int(offsets[-1])
    fill = offsets[:-1].copy()
    sx, sy, sl, sd, ss = (np.empty(total, np.float32) for _ in range(5))
    sq = np.empty(total, np.uint32)
    order = np.empty(total, np.int32 if total < 2**31 else np.int64)
    first_row = 0
    for cells, (x, y, lam, data, stat, dq), divisor in columns:
        _scatter_rows(cells, fill, first_row, x, y, lam, data, stat, dq, float(divisor), sx, sy, sl, sd, ss, sq, order)
        first_row += len(cells)
    return PixGrid(grid.nx, nyt, grid.nz, offsets, order, sx, sy, sl, sd, ss, sq)
