"""Pixel grid: the pixel-table rows sorted into the cells of the output cube.

As in ESO's muse_pixgrid, every row goes into the cell nearest to it
(``lround`` of its grid coordinate, rows outside the grid clamped to the edge
cells), and rows keep their table order inside a cell.  Here the grid is a
compressed-sparse-row structure built by a stable counting sort: the columns
are copied in cell order so that the kernels read contiguous memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

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


@njit(cache=True, nogil=True, parallel=True)
def _cell_of_rows(xpos, ypos, lbda, crval1, crval2, crval3, cd3, nx, ny, nz, cells):
    for row in prange(len(xpos)):
        # pixel coordinates of a linear CD = diag(1, 1) grid with CRPIX = 1
        i = lround_nb((np.float64(xpos[row]) - crval1) + 1.0) - 1
        j = lround_nb((np.float64(ypos[row]) - crval2) + 1.0) - 1
        l = lround_nb((np.float64(lbda[row]) - crval3) / cd3 + 1.0) - 1
        i = min(max(i, 0), nx - 1)
        j = min(max(j, 0), ny - 1)
        l = min(max(l, 0), nz - 1)
        cells[row] = i + nx * (j + ny * l)


@njit(cache=True, nogil=True)
def _counting_sort(cells, ncell, xpos, ypos, lbda, data, stat, dq, order):
    n = len(cells)
    offsets = np.zeros(ncell + 1, np.int64)
    for row in range(n):
        offsets[cells[row] + 1] += 1
    for c in range(ncell):
        offsets[c + 1] += offsets[c]
    fill = offsets[:-1].copy()
    sx = np.empty(n, np.float32)
    sy = np.empty(n, np.float32)
    sl = np.empty(n, np.float32)
    sd = np.empty(n, np.float32)
    ss = np.empty(n, np.float32)
    sq = np.empty(n, np.uint32)
    for row in range(n):
        c = cells[row]
        k = fill[c]
        fill[c] = k + 1
        order[k] = row
        sx[k] = xpos[row]
        sy[k] = ypos[row]
        sl[k] = lbda[row]
        sd[k] = data[row]
        ss[k] = stat[row]
        sq[k] = dq[row]
    return offsets, sx, sy, sl, sd, ss, sq


def build_pixgrid(grid: CubeGrid, xpos, ypos, lambda_, data, stat, dq) -> PixGrid:
    """Sort the pixel-table rows into the cells of ``grid``."""
    xpos = np.ascontiguousarray(xpos, np.float32)
    ypos = np.ascontiguousarray(ypos, np.float32)
    lambda_ = np.ascontiguousarray(lambda_, np.float32)
    ncell = grid.nx * grid.ny * grid.nz
    # 32-bit cell and row indices where they fit: the grid costs 32 bytes a row
    small = np.int32 if max(ncell, len(xpos)) < 2**31 else np.int64
    cells = np.empty(len(xpos), small)
    _cell_of_rows(xpos, ypos, lambda_, float(grid.crval1), float(grid.crval2), float(grid.crval3),
                  float(grid.cd3), grid.nx, grid.ny, grid.nz, cells)
    order = np.empty(len(xpos), small)
    offsets, sx, sy, sl, sd, ss, sq = _counting_sort(
        cells, ncell, xpos, ypos, lambda_, np.ascontiguousarray(data, np.float32),
        np.ascontiguousarray(stat, np.float32), np.ascontiguousarray(dq).astype(np.uint32, copy=False),
        order)
    del cells
    return PixGrid(grid.nx, grid.ny, grid.nz, offsets, order, sx, sy, sl, sd, ss, sq)


@njit(cache=True, nogil=True)
def _scatter_rows(cells, fill, first_row, xpos, ypos, lbda, data, stat, dq, divisor,
                  sx, sy, sl, sd, ss, sq, order):
    """Append one table's rows to their cells (stable), dividing data by ``divisor`` (stat by its square)."""
    scale = divisor != 1.0
    divisor2 = divisor * divisor
    for row in range(len(cells)):
        c = cells[row]
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


@njit(cache=True, nogil=True, parallel=True)
def _plane_of_rows(lbda, crval3, cd3, nz, planes):
    for row in prange(len(lbda)):
        l = lround_nb((np.float64(lbda[row]) - crval3) / cd3 + 1.0) - 1
        planes[row] = min(max(l, 0), nz - 1)


def plane_of_rows(grid: CubeGrid, lambda_: np.ndarray) -> np.ndarray:
    """The wavelength plane (cell index along lambda) of every row, as the grid assigns it."""
    planes = np.empty(len(lambda_), np.int32)
    _plane_of_rows(np.ascontiguousarray(lambda_, np.float32), float(grid.crval3), float(grid.cd3),
                   grid.nz, planes)
    return planes


def build_pixgrid_from_tables(grid: CubeGrid, tables: list, divisors) -> PixGrid:
    """Sort the rows of several pixel tables, in list order, into the cells of ``grid``.

    Equivalent to :func:`build_pixgrid` on the concatenated tables after dividing
    table ``k`` by ``divisors[k]`` (the per-IFU flux scaling), but without ever
    holding the merged table: each entry of ``tables`` (an object with xpos, ypos,
    lambda_, data, stat, dq, or a function returning one, called once per pass) is set
    to None once its rows are copied, so its memory is released while the sorted
    columns fill up.
    """
    def get(index):
        entry = tables[index]
        return entry() if callable(entry) else entry

    ncell = grid.nx * grid.ny * grid.nz
    counts = np.zeros(ncell, np.int64)
    limits = (float(grid.crval1), float(grid.crval2), float(grid.crval3), float(grid.cd3),
              grid.nx, grid.ny, grid.nz)
    small = np.int32 if ncell < 2**31 else np.int64

    def cells_of(table):
        cells = np.empty(len(table.xpos), small)
        _cell_of_rows(np.ascontiguousarray(table.xpos, np.float32), np.ascontiguousarray(table.ypos, np.float32),
                      np.ascontiguousarray(table.lambda_, np.float32), *limits, cells)
        return cells

    total = 0
    for index in range(len(tables)):
        table = get(index)
        total += len(table.xpos)
        counts += np.bincount(cells_of(table), minlength=ncell)
        del table
    offsets = np.zeros(ncell + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    del counts
    fill = offsets[:-1].copy()
    sx, sy, sl, sd, ss = (np.empty(total, np.float32) for _ in range(5))
    sq = np.empty(total, np.uint32)
    order = np.empty(total, np.int32 if total < 2**31 else np.int64)
    first_row = 0
    for index in range(len(tables)):
        table = get(index)
        tables[index] = None
        _scatter_rows(cells_of(table), fill, first_row, np.ascontiguousarray(table.xpos, np.float32),
                      np.ascontiguousarray(table.ypos, np.float32), np.ascontiguousarray(table.lambda_, np.float32),
                      np.ascontiguousarray(table.data, np.float32), np.ascontiguousarray(table.stat, np.float32),
                      np.ascontiguousarray(table.dq).astype(np.uint32, copy=False), float(divisors[index]),
                      sx, sy, sl, sd, ss, sq, order)
        first_row += len(table.xpos)
        del table
    return PixGrid(grid.nx, grid.ny, grid.nz, offsets, order, sx, sy, sl, sd, ss, sq)
