"""ESO's constants and definitions, pinned by independent reference formulas.

Each test here evaluates a rule from its definition (as the ESO documentation and the
MUSE pipeline's behaviour state it), written plainly in NumPy without the package's kernels or
constants, and requires the package to give the same numbers: sigma clipping of whole random
stacks, the 5 x 7 median window of the TWILIGHT_CUBE planes, the drizzle weights in x, y and
wavelength.  (The pixel-table wavelengths against the WAVECAL polynomial evaluated in extended
precision: tests/test_pixtable.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from musetwilight.core import combine, smooth
from musetwilight.core.images import MuseImage
from musetwilight.core.resample import ResampleOptions, resample_cube
from musetwilight.params import CrType, Resample, make_settings

# --------------------------------------------------------------------------- sigma clipping


def sigclip_reference(data: np.ndarray, lsigma: float, hsigma: float) -> np.ndarray:
    """ESO's sigclip combination of a stack (n, ny, nx), all pixels good, as float32.

    Per pixel: the median (the middle value, or lo + (hi - lo) / 2 of the middle pair, in double),
    the mean absolute deviation from it, the values within [median - lsigma x mdev,
    median + hsigma x mdev] kept (all of them when that interval is empty), their mean.
    """
    values = data.astype(np.float64)
    n = values.shape[0]
    ordered = np.sort(values, axis=0)
    if n % 2:
        median = ordered[n // 2]
    else:
        lo, hi = ordered[n // 2 - 1], ordered[n // 2]
        median = lo + (hi - lo) / 2.0
    mdev = np.zeros(values.shape[1:])
    for k in range(n):  # the sums run over the exposures in order, as the definition is written
        mdev += np.abs(values[k] - median)
    mdev /= n
    low, high = median - lsigma * mdev, median + hsigma * mdev
    keep = (values >= low) & (values <= high) | ~(high > low)
    total, count = np.zeros(values.shape[1:]), np.zeros(values.shape[1:])
    for k in range(n):
        total += np.where(keep[k], values[k], 0.0)
        count += keep[k]
    return (total / count).astype(np.float32)


@pytest.mark.parametrize("n, lsigma, hsigma", [(5, 1.0, 2.0), (6, 2.0, 0.7), (7, 0.8, 1.3), (4, 1.5, 1.5),
                                             (3, 0.5, 1.2), (3, 1.1, 0.4)])  # 3: a path of its own
def test_sigclip_of_random_stacks_equals_the_definition(n, lsigma, hsigma):
    rng = np.random.default_rng(n)
    shape = (n, 40, 50)
    data = rng.normal(1000, 30, shape).astype(np.float32)
    data[rng.random(shape) < 0.03] += rng.uniform(200, 3000, np.count_nonzero(rng.random(shape) < 0.03))[:1]
    images = [MuseImage(data[k].copy(), np.zeros(shape[1:], np.uint32), np.ones(shape[1:], np.float32),
                        fits.Header({"EXPTIME": 10.0})) for k in range(n)]
    settings = make_settings({"combine": "sigclip", "lsigma": lsigma, "hsigma": hsigma})
    ours = combine.combine_exposures(images, settings)
    reference = sigclip_reference(data, lsigma, hsigma)
    np.testing.assert_array_equal(ours.data, reference)
    # the two bounds really act on this stack: using lsigma for both changes the result
    if lsigma != hsigma:
        assert np.count_nonzero(sigclip_reference(data, lsigma, lsigma) != reference) > 100


# --------------------------------------------------------------------------- the plane median


def window_median_reference(plane: np.ndarray, bad: np.ndarray, width: int = 5, height: int = 7):
    """The masked median over a window ``width`` columns by ``height`` rows, cut at the edges;
    the middle pair's midpoint lo + (hi - lo) / 2 in single precision."""
    ny, nx = plane.shape
    out = np.zeros((ny, nx), np.float32)
    empty = np.zeros((ny, nx), bool)
    for y in range(ny):
        for x in range(nx):
            rows = slice(max(y - height // 2, 0), min(y + height // 2, ny - 1) + 1)
            cols = slice(max(x - width // 2, 0), min(x + width // 2, nx - 1) + 1)
            values = np.sort(plane[rows, cols][~bad[rows, cols]])
            if values.size == 0:
                empty[y, x] = True
            elif values.size % 2:
                out[y, x] = values[values.size // 2]
            else:
                lo, hi = values[values.size // 2 - 1], values[values.size // 2]
                out[y, x] = lo + (hi - lo) / np.float32(2)
    return out, empty


def test_plane_median_is_five_columns_by_seven_rows():
    rng = np.random.default_rng(7)
    ny, nx = 19, 23
    # a plane whose columns and rows differ strongly, so that a 7 x 5 window gives other values
    plane = (rng.normal(1, 0.05, (ny, nx)) * (1 + 0.2 * (np.arange(nx) % 3))[None, :]
             * (1 + 0.1 * (np.arange(ny) % 4))[:, None]).astype(np.float32)
    bad = rng.random((ny, nx)) < 0.1
    bad[5:12, 8:13] = True  # a whole 5 x 7 window empty in its middle
    filtered, empty = smooth.plane_median(plane, bad, [])
    reference, reference_empty = window_median_reference(plane, bad)
    np.testing.assert_array_equal(empty, reference_empty)
    assert empty[8, 10] and empty.sum() == 1
    np.testing.assert_array_equal(filtered[~empty], reference[~empty])
    transposed, _ = window_median_reference(plane, bad, width=7, height=5)
    assert np.count_nonzero(transposed != reference) > 0.5 * plane.size


# --------------------------------------------------------------------------- drizzle weights


def overlap(centre: np.ndarray, size: float, cell_centre: float, cell_size: float) -> np.ndarray:
    """Length of [centre - size/2, centre + size/2] inside [cell_centre - cell_size/2, + cell_size/2]."""
    low = np.maximum(centre - size / 2, cell_centre - cell_size / 2)
    high = np.minimum(centre + size / 2, cell_centre + cell_size / 2)
    return np.clip(high - low, 0.0, None)


def test_drizzle_weights_rows_by_their_overlap_in_x_y_and_wavelength():
    """Rows between two plane centres count in both planes by their spectral overlap.

    Input pixels are 1 x 1 spaxel x 1.25 Angstrom (the MUSE sampling, pixfrac 1), output voxels
    1 x 1 x dlambda; a voxel is the overlap-weighted mean of the rows (ESO's drizzle).
    """
    lam = np.array([5000.0, 5124.6, 5125.3, 5374.9, 5375.4, 5500.0], np.float32)
    x = np.array([0.0, 0.3, -0.2, 0.1, 0.0, 0.45], np.float32)
    y = np.array([0.0, -0.1, 0.2, 0.0, 0.35, 0.0], np.float32)
    data = np.array([10.0, 20.0, 40.0, 80.0, 160.0, 320.0], np.float32)
    stat = np.ones(lam.size, np.float32)
    options = ResampleOptions(Resample.DRIZZLE, CrType.MEDIAN, 0.0)
    cube = resample_cube(x, y, lam, data, stat, np.zeros(lam.size, np.uint32), options=options, dlambda=250.0)
    grid = cube.grid
    assert (grid.nz, grid.crval3) == (3, 5000.0)
    compared = 0
    for plane in range(grid.nz):
        for j in range(grid.ny):
            for i in range(grid.nx):
                weights = (overlap(x.astype(float), 1.0, grid.crval1 + i, 1.0)
                           * overlap(y.astype(float), 1.0, grid.crval2 + j, 1.0)
                           * overlap(lam.astype(float), 1.25, grid.crval3 + 250.0 * plane, 250.0))
                if weights.sum() == 0:
                    assert np.isnan(cube.data[plane, j, i])
                    continue
                expected = np.sum(weights * data) / np.sum(weights)
                # float32 voxels of a double weighted mean: equal up to rounding in the last bit
                assert cube.data[plane, j, i] == pytest.approx(expected, rel=1.2e-7, abs=0), (plane, j, i)
                compared += 1
    assert compared >= 4
    # the rows near the plane boundaries really count in two planes (the spectral term matters)
    w0 = overlap(lam.astype(float), 1.25, 5000.0, 250.0)
    w1 = overlap(lam.astype(float), 1.25, 5250.0, 250.0)
    assert (w0[1:3] > 0).all() and (w1[1:3] > 0).all()


FLT_MAX = float(np.finfo(np.float32).max)  # ESO's weight of a row at a voxel centre


def _linear_cube_in_loop_order(x, y, lam, data, stat, grid, order):
    """The linear-weighted cube by its definition, each voxel summing the rows of its 27
    neighbour cells in the given loop order of the cell offsets ("xyl": ESO's i2, j2, l2)."""
    cell = [np.clip(np.floor(np.float64(v) - c + 0.5).astype(int), 0, n - 1)
            for v, c, n in ((x, grid.crval1, grid.nx), (y, grid.crval2, grid.ny))]
    cell.append(np.clip(np.floor((np.float64(lam) - grid.crval3) / grid.cd3 + 0.5).astype(int), 0, grid.nz - 1))
    members: dict[tuple[int, int, int], list[int]] = {}
    for row, key in enumerate(zip(*cell)):
        members.setdefault(tuple(int(k) for k in key), []).append(row)
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    if order == "lyx":
        offsets = [(a, b, c) for c in (-1, 0, 1) for b in (-1, 0, 1) for a in (-1, 0, 1)]
    out_data = np.full((grid.nz, grid.ny, grid.nx), np.nan, np.float32)
    out_stat = np.full_like(out_data, np.nan)
    for l in range(grid.nz):
        for j in range(grid.ny):
            for i in range(grid.nx):
                sw = sd = ss = 0.0
                for di, dj, dl in offsets:
                    for row in members.get((i + di, j + dj, l + dl), []):
                        dx = abs((grid.crval1 + i) - float(x[row]))
                        dy = abs((grid.crval2 + j) - float(y[row]))
                        dz = abs((grid.crval3 + l * grid.cd3) - float(lam[row])) * (1.0 / 1.25)
                        r = math.sqrt(dx * dx + dy * dy + dz * dz)
                        w = FLT_MAX if r == 0 else 1.0 / r
                        sw += w
                        sd += float(data[row]) * w
                        ss += float(stat[row]) * w * w
                if sw > 0:
                    out_data[l, j, i], out_stat[l, j, i] = sd / sw, ss / (sw * sw)
    return out_data, out_stat


def test_linear_voxels_add_their_neighbour_cells_in_esos_loop_order():
    """ESO's weighted resampling loops over the neighbour cells x outermost, then y, then
    wavelength, and over each cell's rows in table order; the sums are double, the voxel float.
    Summed in another order, some float32 voxels come out one ulp apart (checked below), so
    the cube must equal the definition in that order exactly."""
    rng = np.random.default_rng(12)
    nrow = 4000
    x = rng.uniform(0.0, 5.0, nrow).astype(np.float32)
    y = rng.uniform(0.0, 4.0, nrow).astype(np.float32)
    lam = rng.uniform(5000.0, 5750.0, nrow).astype(np.float32)
    data = rng.normal(10.0, 1.0, nrow).astype(np.float32)
    stat = rng.lognormal(2.0, 3.0, nrow).astype(np.float32)
    # pairs of coincident rows of +-1e12 that cancel exactly: what they leave of the partial sum
    # depends on what was added before them, which makes the order of the cells visible
    pairs = rng.choice(nrow - 1, 60, replace=False) // 2 * 2
    for first in pairs:
        x[first + 1], y[first + 1], lam[first + 1] = x[first], y[first], lam[first]
        data[first], data[first + 1] = 1e12, -1e12
    options = ResampleOptions(Resample.LINEAR, CrType.MEDIAN, 0.0)
    cube = resample_cube(x, y, lam, data, stat, np.zeros(nrow, np.uint32), options=options, dlambda=250.0)
    eso_data, eso_stat = _linear_cube_in_loop_order(x, y, lam, data, stat, cube.grid, "xyl")
    np.testing.assert_array_equal(cube.data, eso_data)
    np.testing.assert_array_equal(cube.stat, eso_stat)
    other_data, other_stat = _linear_cube_in_loop_order(x, y, lam, data, stat, cube.grid, "lyx")
    assert np.sum(other_data != eso_data) + np.sum(other_stat != eso_stat) > 0  # the order is visible
