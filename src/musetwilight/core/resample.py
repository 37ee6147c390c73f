"""Cube reconstruction of a merged pixel table, as ESO's muse_resampling_cube.

Pipeline for muse_twilight's settings (pixel-unit table, one spaxel per
geometry pixel, pixfrac 1, loop distance 1, renka critical radius 1.25):

1. the rows are sorted into the cells of the output grid (:mod:`.pixgrid`);
2. cosmic rays: per cell, statistics over the cell itself and the 3 x 3 cells
   (x, lambda) in the rows above and below it (other slices, never the CCD
   neighbours in the same slice); rows of the cell above
   ``level + crsigma * dev`` get the Euro3D cosmic-ray bit.  ``iraf``: mean and
   sqrt(sum of variances) / n; ``mean``: mean and sample standard deviation;
   ``median``: median and median absolute deviation.  Only rows with DQ 0 or
   exactly the cosmic-ray bit enter the statistics; fewer than 3 rows = no
   rejection.  Off when crsigma <= 0;
3. each voxel is the weighted mean of the good (DQ 0) rows in the cells up to
   ``ld`` away in x, y and lambda (``nearest``: the closest row of the own cell,
   whatever its DQ); variance sum(w^2 var) / sum(w)^2; voxels whose weight sum
   is not a normal number are empty (NaN).  As in ESO, a good row with a
   non-finite value makes every voxel within reach NaN, even at weight 0.
   (Twilight tables have no weight column, so none is applied.)

Distances for the weights are in pixels spatially and in units of the 1.25 A
MUSE sampling spectrally; drizzle uses the unscaled offsets with input sizes
pixfrac x (1 pix, 1 pix, 1.25 A) and output sizes (1, 1, dlambda).

The kernels loop over output planes (shared among threads); each plane scatters the rows
of the neighbouring cell planes into its spaxels, which visits exactly the
(voxel, row) pairs of ESO's gather loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from ..instrument import SPECTRAL_SAMPLING, Euro3D
from ..params import CrType, Resample, Settings
from .cplmath import median
from .cube import CubeGrid, lround, make_grid
from .pixgrid import PixGrid, build_pixgrid, build_pixgrid_from_tables

EURO3D_COSMICRAY = Euro3D.COSMIC_RAY  # module constants: the Numba kernels read them
EURO3D_MISSDATA = Euro3D.MISSING_DATA

_FLT_MAX = float(np.finfo(np.float32).max)
_DBL_MIN = float(np.finfo(np.float64).tiny)
_ZNORM = 1.0 / SPECTRAL_SAMPLING  # spectral distance unit: the MUSE sampling

_LINEAR, _QUADRATIC, _RENKA, _DRIZZLE, _LANCZOS = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class ResampleOptions:
    """How the cube is reconstructed: kernel, cosmic-ray rejection, and ESO's fixed settings
    for muse_twilight (pixfrac 1 in x, y and lambda, loop distance 1, renka radius 1.25)."""

    method: Resample = Resample.DRIZZLE
    crtype: CrType = CrType.MEDIAN
    crsigma: float = 50.0
    pixfrac: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ld: int = 1
    rc: float = 1.25

    @classmethod
    def from_settings(cls, settings: Settings) -> ResampleOptions:
        return cls(settings.resample, settings.crtype, settings.crsigma)


@dataclass
class ResampledCube:
    """Result of :func:`resample_cube`; arrays are ``(nz, ny, nx)``."""

    grid: CubeGrid
    data: np.ndarray  # float32, NaN where dq != 0
    stat: np.ndarray  # float32 variance, NaN where dq != 0
    dq: np.ndarray  # uint32: 0 good, MISSDATA empty (nearest: DQ of the chosen row)
    pixel_dq: np.ndarray | None  # uint32 DQ of the input rows, cosmic-ray bit added (None when banded)
    ncosmic: int  # rows carrying the cosmic-ray bit after rejection


# ---------------------------------------------------------------------------
# cosmic-ray rejection


@njit(cache=True, nogil=True)
def _mad_at_least(vals, n, median, bound):
    """True if the median absolute deviation about ``median`` is surely >= bound
    (a counting pass instead of a selection)."""
    below = 0
    for m in range(n):
        below += abs(vals[m] - median) < bound
    # odd n: the middle deviation is >= bound if at most (n - 1) / 2 lie below;
    # even n: the lower middle one (and so their midpoint) if at most n / 2 - 1
    return below <= (n - 1) // 2 if n % 2 == 1 else below <= n // 2 - 1


@njit(cache=True, nogil=True)
def _surely_below_threshold(vals, n, vmax, sigma, work):
    """True if no value up to ``vmax`` can exceed median + sigma x MAD of vals[:n], decided by
    counting instead of the median and MAD selections (False: undecided, compute them).

    With c <= median <= c2 (proved by at most (n-1)//2 values below c and above c2, which
    bounds CPL's median of odd and even counts alike), no value is flagged when the MAD is at
    least b = (vmax - c) / sigma (with rounding margins); the MAD is at least b when at most
    (n-1)//2 deviations from the median are below b, and those values all lie in
    (c - b, c2 + b).  c and c2 bracket the median of a strided sample of 31 values by half
    that sample's MAD.
    """
    k = min(n, 31)
    stride = n // k
    for a in range(k):  # insertion sort of the sample
        v = vals[a * stride]
        b = a - 1
        while b >= 0 and work[b] > v:
            work[b + 1] = work[b]
            b -= 1
        work[b + 1] = v
    centre = work[k // 2]
    for a in range(k):
        v = abs(work[a] - centre)
        b = k + a - 1
        while b >= k and work[b] > v:
            work[b + 1] = work[b]
            b -= 1
        work[b + 1] = v
    half = 0.5 * work[k + k // 2]
    c, c2 = centre - half, centre + half
    margin = 4 * 2.220446049250313e-16 * (abs(vmax) + abs(c))
    bound = max((vmax - c + margin) / sigma * (1 + 1e-12), 0.0) * (1 + 1e-9) + 1e-300
    lo, hi = c - bound, c2 + bound
    below = above = inside = 0
    for m in range(n):
        v = vals[m]
        if v != v:
            return False
        below += v < c
        above += v > c2
        inside += (v > lo) & (v < hi)
    limit = (n - 1) // 2
    return below <= limit and above <= limit and inside <= limit


@njit(cache=True, nogil=True)
def _usable_for_stats(dq):
    return dq == 0 or dq == EURO3D_COSMICRAY


@njit(cache=True, nogil=True, error_model="numpy")  # C semantics: x / 0 is inf or NaN
def _crreject(offsets, data, stat, dq, nx, ny, nz, crtype, sigma, bufsize, jlo, jhi, lstart, lstep, flags):
    """Set the cosmic-ray flags (1 = rejected) of the sorted rows in the cells of rows jlo..jhi
    of the planes lstart, lstart + lstep, ... (one thread's share)."""
    nxy = nx * ny
    for l in range(lstart, nz, lstep):
        vals = np.empty(bufsize, np.float64)
        work = np.empty(bufsize + 100, np.float64)
        for j in range(jlo, jhi + 1):
            for i in range(nx):
                c = i + nx * j + nxy * l
                if offsets[c] == offsets[c + 1]:
                    continue  # nothing to flag
                level = 0.0
                dev = 0.0
                npix = 0
                for j2 in range(j - 1, j + 2):
                    if j2 < 0 or j2 >= ny:
                        continue
                    width = 0 if j2 == j else 1  # same slice: the cell itself only
                    for i2 in range(i - width, i + width + 1):
                        if i2 < 0 or i2 >= nx:
                            continue
                        for l2 in range(l - width, l + width + 1):
                            if l2 < 0 or l2 >= nz:
                                continue
                            c2 = i2 + nx * j2 + nxy * l2
                            for p in range(offsets[c2], offsets[c2 + 1]):
                                if not _usable_for_stats(dq[p]):
                                    continue
                                if crtype == 0:
                                    level += data[p]
                                    dev += stat[p]
                                else:
                                    vals[npix] = data[p]
                                npix += 1
                if npix < 3:
                    continue
                if crtype == 0:  # iraf: mean and the standard error of the mean
                    level /= npix
                    dev = math.sqrt(dev) / npix
                elif crtype == 1:  # mean and sample standard deviation
                    mean = 0.0
                    for m in range(npix):
                        mean += vals[m]
                    mean /= npix
                    var = 0.0
                    for m in range(npix):
                        var += (vals[m] - mean) ** 2
                    level = mean
                    dev = math.sqrt(var / (npix - 1))
                else:  # median and median absolute deviation
                    vmax = -np.inf
                    for p in range(offsets[c], offsets[c + 1]):
                        vmax = max(vmax, np.float64(data[p]))
                    if _surely_below_threshold(vals, np.int64(npix), vmax, sigma, work):
                        continue
                    level = median(vals, np.int64(npix), work, 2.0)
                    if vmax <= level:
                        continue
                    # the MAD is only needed exactly when it could flag vmax
                    margin = 4 * 2.220446049250313e-16 * (abs(vmax) + abs(level))
                    bound = (vmax - level + margin) / sigma * (1 + 1e-12)
                    if _mad_at_least(vals, np.int64(npix), level, bound):
                        continue
                    for m in range(npix):
                        vals[m] = abs(vals[m] - level)
                    dev = median(vals, np.int64(npix), work, 2.0)
                limit = level + sigma * dev
                for p in range(offsets[c], offsets[c + 1]):
                    if data[p] > limit:
                        flags[p] = 1


# ---------------------------------------------------------------------------
# resampling kernels


@njit(cache=True, nogil=True, error_model="numpy")  # C semantics: x / 0 is inf or NaN
def _nearest(offsets, xpos, ypos, lbda, data, stat, dq, nx, ny, nz,
             crval1, crval2, crval3, cd3, jlo, jhi, lstart, lstep, out_data, out_stat, out_dq):
    """The closest row of each voxel's own cell, for the voxel rows jlo..jhi of the planes
    lstart, lstart + lstep, ... (outputs preset to 0, 0 and MISSDATA)."""
    for l in range(lstart, nz, lstep):
        lam = l * cd3 + crval3
        for j in range(jlo, jhi + 1):
            y = crval2 + j
            for i in range(nx):
                x = crval1 + i
                c = i + nx * (j + ny * l)
                start, stop = offsets[c], offsets[c + 1]
                if stop == start:
                    out_dq[l, j, i] = EURO3D_MISSDATA
                    continue
                best = start
                if stop - start > 1:
                    dbest = _FLT_MAX
                    for p in range(start, stop):
                        dx = abs(x - xpos[p])
                        dy = abs(y - ypos[p])
                        dl = abs(lam - lbda[p]) * _ZNORM
                        d = math.sqrt(dx * dx + dy * dy + dl * dl)
                        if d < dbest:
                            dbest = d
                            best = p
                out_data[l, j, i] = data[best]
                out_stat[l, j, i] = stat[best]
                out_dq[l, j, i] = dq[best]
    return out_data, out_stat, out_dq


@njit(cache=True, nogil=True, inline="always")
def _sinc(r):
    if abs(r) < 2.220446049250313e-16:
        return 1.0
    return math.sin(math.pi * r) / (math.pi * r)


@njit(cache=True, nogil=True, inline="always")
def _drizzle_term(din, dout, d):
    """Overlap length of an input pixel of size din with an output cell of size dout."""
    if d + dout / 2.0 <= din / 2.0:
        t = dout
    else:
        t = (din + dout) / 2.0 - d
    return t


@njit(cache=True, nogil=True, error_model="numpy")  # C semantics: x / 0 is inf or NaN
def _weighted(offsets, xpos, ypos, lbda, data, stat, dq, nx, ny, nz,
              crval1, crval2, crval3, cd3, method, ld, renka_rc, xin, yin, zin, jlo, jhi, lstart, lstep,
              out_data, out_stat, out_dq):
    """Weighted means of the good rows around each voxel, for the voxel rows jlo..jhi of the
    planes lstart, lstart + lstep, ... (outputs preset to 0, 0 and MISSDATA)."""
    nxy = nx * ny
    xout, yout, zout = 1.0, 1.0, abs(cd3)
    volume = xin * yin * zin
    jfirst, jlast = max(jlo - ld, 0), min(jhi + ld, ny - 1)  # the cell rows that reach them
    for l in range(lstart, nz, lstep):
        lam = l * cd3 + crval3
        sumw = np.zeros(nxy, np.float64)
        sumd = np.zeros(nxy, np.float64)
        sums = np.zeros(nxy, np.float64)
        lfirst, llast = max(l - ld, 0), min(l + ld, nz - 1)
        # the cells in ESO's order, x outermost, then y, then wavelength: each voxel adds the
        # rows of its neighbour cells in the order of ESO's loops over i2, j2 and l2
        for ic in range(nx):
            for jc in range(jfirst, jlast + 1):
                for l2 in range(lfirst, llast + 1):
                    c = ic + nx * (jc + ny * l2)
                    start, stop = offsets[c], offsets[c + 1]
                    if start == stop:
                        continue
                    i1, i2 = max(ic - ld, 0), min(ic + ld, nx - 1)
                    j1, j2 = max(jc - ld, jlo), min(jc + ld, jhi)
                    for p in range(start, stop):
                        if dq[p] != 0:
                            continue
                        dp = np.float64(data[p])
                        sp = np.float64(stat[p])
                        # ESO adds every neighbour, weight 0 or not: a non-finite
                        # value spoils all of them, so such rows are never pruned
                        keep_all = not (math.isfinite(dp) and math.isfinite(sp))
                        dl = abs(lam - lbda[p])
                        zterm = 0.0
                        if method == _DRIZZLE:
                            zterm = _drizzle_term(zin, zout, dl)
                            if zterm <= 0:
                                if not keep_all:
                                    continue
                                zterm = 0.0
                            zterm = min(zterm, zin)
                        else:
                            dl *= _ZNORM
                            if method == _LANCZOS:
                                if dl > ld:
                                    if not keep_all:
                                        continue
                                    zterm = 0.0
                                else:
                                    zterm = _sinc(dl) * _sinc(dl / ld)
                        xp = np.float64(xpos[p])
                        yp = np.float64(ypos[p])
                        for i in range(i1, i2 + 1):
                            dx = abs((crval1 + i) - xp)
                            xterm = 0.0
                            if method == _DRIZZLE:
                                xterm = _drizzle_term(xin, xout, dx)
                                if xterm <= 0:
                                    if not keep_all:
                                        continue
                                    xterm = 0.0
                                xterm = min(xterm, xin)
                            elif method == _LANCZOS:
                                if dx >= ld:
                                    if not keep_all:
                                        continue
                                else:
                                    xterm = _sinc(dx) * _sinc(dx / ld)
                            for j in range(j1, j2 + 1):
                                dy = abs((crval2 + j) - yp)
                                if method == _DRIZZLE:
                                    yterm = _drizzle_term(yin, yout, dy)
                                    if yterm <= 0:
                                        if not keep_all:
                                            continue
                                        yterm = 0.0
                                    w = xterm * min(yterm, yin) * zterm / volume
                                elif method == _LANCZOS:
                                    if dy >= ld:
                                        if not keep_all:
                                            continue
                                        w = 0.0
                                    else:
                                        w = xterm * _sinc(dy) * _sinc(dy / ld) * zterm
                                else:
                                    r2 = dx * dx + dy * dy + dl * dl
                                    if method == _QUADRATIC:
                                        w = _FLT_MAX if r2 == 0 else 1.0 / r2
                                    else:
                                        r = math.sqrt(r2)
                                        if method == _LINEAR:
                                            w = _FLT_MAX if r == 0 else 1.0 / r
                                        elif r == 0:
                                            w = _FLT_MAX
                                        elif r >= renka_rc:
                                            w = _DBL_MIN
                                        else:
                                            q = (renka_rc - r) / (renka_rc * r)
                                            w = q * q
                                k = i + nx * j
                                sumw[k] += w
                                sumd[k] += dp * w
                                sums[k] += sp * w * w
        for j in range(jlo, jhi + 1):
            for i in range(nx):
                k = i + nx * j
                w = sumw[k]
                if math.isfinite(w) and abs(w) >= _DBL_MIN:
                    out_data[l, j, i] = sumd[k] / w
                    out_stat[l, j, i] = sums[k] / (w * w)
                    out_dq[l, j, i] = 0


# ---------------------------------------------------------------------------
# driver


def _on_threads(kernel: Callable[..., None], inputs: tuple, outputs: tuple, nz: int, threads: int) -> None:
    """``kernel(*inputs, lstart, lstep, *outputs)`` on ``threads`` threads, each taking every
    threads-th plane (the kernels release the GIL; the planes are independent, so the
    result does not depend on the number of threads)."""
    threads = max(1, min(threads, nz))
    if threads == 1:
        kernel(*inputs, 0, 1, *outputs)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        shares = [pool.submit(kernel, *inputs, start, threads, *outputs) for start in range(threads)]
        for share in shares:
            share.result()


def reject_cosmics(pix: PixGrid, crtype: CrType = CrType.MEDIAN, crsigma: float = 50.0,
                   rows: tuple[int, int] | None = None, threads: int = 1) -> int:
    """Flag cosmic rays in ``pix.dq`` (sorted rows) in place, for the cells of the grid rows
    ``rows`` (first, last; default all); return how many rows carry the cosmic-ray bit
    afterwards.  ``crsigma <= 0`` does nothing."""
    jlo, jhi = rows if rows is not None else (0, pix.ny - 1)
    if crsigma > 0:
        bufsize = max(19 * pix.max_count, 1)
        flags = np.zeros(len(pix.data), np.uint8)
        _on_threads(_crreject, (pix.offsets, pix.data, pix.stat, pix.dq, pix.nx, pix.ny, pix.nz, crtype.code,
                                float(crsigma), bufsize, jlo, jhi), (flags,), pix.nz, threads)
        pix.dq[flags.view(bool)] |= EURO3D_COSMICRAY
    return int(np.count_nonzero(pix.dq & EURO3D_COSMICRAY))


def resample_pixgrid(pix: PixGrid, grid: CubeGrid, options: ResampleOptions, rows: tuple[int, int] | None = None,
                     threads: int = 1):
    """Resample the (cosmic-ray flagged) sorted rows onto ``grid``, for the voxel rows ``rows``.

    Returns float32 data and variance cubes (0 where empty) and the uint32 DQ cube (0 good,
    MISSDATA empty; nearest: the DQ of the row taken); ``grid`` is the pixel grid's own
    (for a tile: the tile's rows, its CRVAL2 shifted to its first row)."""
    jlo, jhi = rows if rows is not None else (0, pix.ny - 1)
    outputs = (np.zeros(grid.shape, np.float32), np.zeros(grid.shape, np.float32),
               np.full(grid.shape, EURO3D_MISSDATA, np.uint32))
    args = (pix.offsets, pix.xpos, pix.ypos, pix.lbda, pix.data, pix.stat, pix.dq,
            grid.nx, grid.ny, grid.nz, float(grid.crval1), float(grid.crval2),
            float(grid.crval3), float(grid.cd3))
    if options.method is Resample.NEAREST:
        _on_threads(_nearest, (*args, jlo, jhi), outputs, grid.nz, threads)
        return outputs
    ld = options.ld if options.ld > 0 else 1
    renka_rc = options.rc * math.sqrt(grid.cd1 ** 2 + grid.cd2 ** 2 + (grid.cd3 * _ZNORM) ** 2)
    pfx, pfy, pfl = options.pixfrac
    xin, yin, zin = pfx / 1.0, pfy / 1.0, pfl / _ZNORM
    _on_threads(_weighted, (*args, options.method.code, ld, renka_rc, xin, yin, zin, jlo, jhi), outputs,
                grid.nz, threads)
    return outputs


def resample_cube(xpos, ypos, lambda_, data, stat, dq, grid: CubeGrid | None = None,
                  options: ResampleOptions = ResampleOptions(), dlambda: float = 250.0,
                  threads: int = 1) -> ResampledCube:
    """Reconstruct the cube of a merged pixel table in pixel units (ESO's
    muse_resampling_cube with muse_twilight's settings).

    The columns are the pixel table's (float32 xpos, ypos, lambda, data, stat;
    uint32 dq).  Without ``grid`` the grid comes from :func:`make_grid` with
    ``dlambda``.  Empty voxels (and for ``nearest`` voxels whose row is flagged)
    are NaN in data and stat; ``pixel_dq`` gives the rows' DQ with the cosmic-ray bits.
    """
    if grid is None:
        grid = make_grid(xpos, ypos, lambda_, dlambda)
    pix = build_pixgrid(grid, xpos, ypos, lambda_, data, stat, dq)
    ncosmic = reject_cosmics(pix, options.crtype, options.crsigma, threads=threads)
    cube_data, cube_stat, cube_dq = resample_pixgrid(pix, grid, options, threads=threads)
    _blank(cube_data, cube_stat, cube_dq)
    pixel_dq = np.empty(len(pix.order), np.uint32)
    pixel_dq[pix.order] = pix.dq
    return ResampledCube(grid, cube_data, cube_stat, cube_dq, pixel_dq, ncosmic)


def _blank(data: np.ndarray, stat: np.ndarray, dq: np.ndarray) -> None:
    bad = dq != 0
    data[bad] = np.nan
    stat[bad] = np.nan


@dataclass
class TableSource:
    """A pixel table for the tiled resampling: its size, the range of its ypos, and a
    function returning its columns (xpos, ypos, lambda_, data, stat, dq), e.g. read from disk."""

    nrow: int
    ylimits: tuple[float, float]
    load: Callable[[], Any]
    discard: Callable[[], None] | None = None  # frees its storage once the last tile has it

    @classmethod
    def of(cls, table: Any) -> TableSource:
        """A source for a table in memory, or for an object that loads one (``nrow``, ``ylimits``, ``load()``)."""
        if hasattr(table, "load"):
            return cls(table.nrow, table.ylimits, table.load, getattr(table, "discard", None))
        ypos = np.asarray(table.ypos)
        limits = (float(ypos.min()), float(ypos.max())) if ypos.size else (0.0, 0.0)
        return cls(len(ypos), limits, lambda: table)

    def cell_rows(self, grid: CubeGrid) -> tuple[int, int]:
        """The first and last grid row its rows fall into (clamped to the grid, as the cells are)."""
        rows = [min(max(lround((np.float64(np.float32(y)) - grid.crval2) + 1.0) - 1, 0), grid.ny - 1)
                for y in self.ylimits]
        return rows[0], rows[1]


def tile_rows(sources: list[TableSource], grid: CubeGrid, rows_per_tile: int | None) -> list[tuple[int, int]]:
    """Consecutive ranges of cube rows (first, end) holding about ``rows_per_tile`` table rows
    each (one range for None)."""
    if rows_per_tile is None:
        return [(0, grid.ny)]
    total = sum(source.nrow for source in sources)
    height = max(1, int(rows_per_tile * grid.ny // max(total, 1)))
    return [(y0, min(y0 + height, grid.ny)) for y0 in range(0, grid.ny, height)]


def resample_tables(tables: list, divisors, grid: CubeGrid, options: ResampleOptions,
                    rows_per_tile: int | None = None, prefetch: bool = True, threads: int = 1) -> ResampledCube:
    """:func:`resample_cube` of the concatenation of ``tables`` (each divided by its divisor),
    a tile of cube rows at a time, without ever holding the merged table.

    A voxel depends on the rows of the cells next to it (the kernels' +-1 cell) and on their
    cosmic-ray flags, which depend on the cells next to those: each tile of rows y0..y1-1 is
    resampled from the table rows of the cells in rows y0-2..y1+1, the flags computed for rows
    y0-1..y1, so the result is identical to resampling everything at once (the rows of a
    cell keep their order).  ``tables`` are pixel tables in memory or objects that load one
    (:class:`TableSource`); each is loaded when the first tile needs it (the next one read in
    the background while a tile is computed, with ``prefetch``) and released after the last
    (a spilled table's files removed).
    The entries of ``tables`` are set to None.  ``pixel_dq`` is returned for a single tile
    only; ``ncosmic`` counts each flagged row once.  ``threads`` share the sorting of the rows into
    cells and the planes of each tile.
    """
    sources = [TableSource.of(table) for table in tables]
    for index in range(len(tables)):
        tables[index] = None
    cell_rows = [source.cell_rows(grid) for source in sources]
    tiles = tile_rows(sources, grid, rows_per_tile)
    data = np.empty(grid.shape, np.float32)
    stat = np.empty(grid.shape, np.float32)
    dq = np.empty(grid.shape, np.uint32)
    ncosmic, pixel_dq = 0, None

    def reach(number: int) -> tuple[int, int]:
        y0, y1 = tiles[number]
        return max(y0 - 2, 0), min(y1 + 1, grid.ny - 1)

    def wanted(number: int) -> list[int]:
        first, last = reach(number)
        return [k for k, (jlo, jhi) in enumerate(cell_rows) if jlo <= last and jhi >= first]

    with ThreadPoolExecutor(max_workers=1) as reader:
        loaded: dict[int, Future] = {}

        def fetch(k: int) -> None:
            if k not in loaded:
                loaded[k] = reader.submit(sources[k].load)

        for number, (y0, y1) in enumerate(tiles):
            needed = wanted(number)
            for k in needed:
                fetch(k)
            if prefetch and number + 1 < len(tiles):
                for k in wanted(number + 1):
                    fetch(k)
            first, last = reach(number)
            pix = build_pixgrid_from_tables(grid, [(loaded[k].result(), divisors[k]) for k in needed], first, last,
                                            threads)
            core = (y0 - first, y1 - 1 - first)
            flagged = (max(y0 - 1, 0) - first, min(y1, grid.ny - 1) - first)
            reject_cosmics(pix, options.crtype, options.crsigma, flagged, threads)
            ncosmic += _cosmics_in_rows(pix.offsets, pix.dq, pix.nx, pix.ny, pix.nz, core[0], core[1])
            cube = resample_pixgrid(pix, grid.rows(first, last), options, core, threads)
            for out, tile in zip((data, stat, dq), cube):
                out[:, y0:y1] = tile[:, core[0]:core[1] + 1]
            if len(tiles) == 1:
                pixel_dq = np.empty(len(pix.order), np.uint32)
                pixel_dq[pix.order] = pix.dq
            del pix, cube
            later = wanted(number + 1) if number + 1 < len(tiles) else []
            for k in [k for k in loaded if k not in later]:
                loaded.pop(k)
                discard = sources[k].discard
                if discard is not None:  # its scratch files, while the next tile is computed
                    reader.submit(discard)
    _blank(data, stat, dq)
    return ResampledCube(grid, data, stat, dq, pixel_dq, ncosmic)


@njit(cache=True, nogil=True)
def _cosmics_in_rows(offsets, dq, nx, ny, nz, jlo, jhi):
    """Rows carrying the cosmic-ray bit in the cells of grid rows jlo..jhi (all planes)."""
    count = 0
    for l in range(nz):
        for p in range(offsets[(jlo + ny * l) * nx], offsets[(jhi + 1 + ny * l) * nx]):
            if dq[p] & EURO3D_COSMICRAY:
                count += 1
    return count
