"""Cube resampling (cube.py, pixgrid.py, resample.py): properties, known answers, ESO parity.

ESO's oracle is ``muse_scipost_make_cube``: it runs the same muse_resampling_cube
as muse_twilight on a pixel table given as input, with the same settings
(pixfrac 1, ld 1, pixel-unit grid), so every resample x crtype combination can be
checked on the same table without the rest of the recipe.
"""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from parity import assert_bit_identical

from musetwilight.core.cplmath import median
from musetwilight.core.cube import CubeGrid, lround, make_grid, white_light
from musetwilight.core.pixgrid import build_pixgrid, build_pixgrid_from_tables
from musetwilight.core.resample import EURO3D_COSMICRAY, EURO3D_MISSDATA, ResampleOptions, resample_cube
from musetwilight.errors import MergeError, ParameterError
from musetwilight.params import CrType, Resample, make_settings
from musetwilight.tools import eso

METHODS = [str(m) for m in Resample]
CRTYPES = [str(c) for c in CrType]

requires_esorex = pytest.mark.skipif(eso.esorex_path() is None,
                                     reason="esorex (ESO MUSE pipeline) is not installed")


def muse_like_table(seed=0, nstack=2, nrow=6, columns=12, lmin=5000.0, lmax=7000.0):
    """A small merged pixel table laid out like MUSE: slices one geometry pixel
    high, CCD columns sampled every ~1.25 A with column-dependent zero points,
    a falling twilight-like spectrum, noise, bad pixels and cosmic rays."""
    rng = np.random.default_rng(seed)
    nslice = nstack * nrow
    x0 = np.repeat(np.arange(nstack) * (columns + 0.6), nrow) + rng.uniform(-0.3, 0.3, nslice) + 10.3
    y0 = np.tile(np.arange(nrow), nstack) + rng.uniform(-0.1, 0.1, nslice) - 3.7
    xcol = (x0[:, None] + np.arange(columns)[None, :] * 0.97).ravel()
    ycol = np.repeat(y0, columns) + rng.normal(0, 0.02, xcol.size)
    nk = int((lmax - lmin) / 1.25) + 2
    lam = (lmin - 1.2 + rng.uniform(0, 1.0, xcol.size))[:, None] + 1.25 * np.arange(nk)[None, :]
    keep = (lam >= lmin) & (lam <= lmax)
    x = np.broadcast_to(xcol[:, None], lam.shape)[keep].astype(np.float32)
    y = np.broadcast_to(ycol[:, None], lam.shape)[keep].astype(np.float32)
    lam = lam[keep].astype(np.float32)
    flux = 900.0 * (1 + 0.2 * np.sin(x / 5.0)) * (lam / 6000.0) ** -3
    data = (flux + rng.normal(0, 1, flux.size) * np.sqrt(flux)).astype(np.float32)
    stat = (flux + 4.0).astype(np.float32)
    dq = np.zeros(flux.size, np.uint32)
    dq[rng.choice(flux.size, flux.size // 500, replace=False)] = 1 << 8
    cosmics = rng.choice(flux.size, flux.size // 1000, replace=False)
    data[cosmics] += rng.uniform(300, 30000, cosmics.size).astype(np.float32)
    return {"xpos": x, "ypos": y, "lambda": lam, "data": data, "stat": stat, "dq": dq}


def options(method="drizzle", crtype="median", crsigma=50.0) -> ResampleOptions:
    return ResampleOptions(Resample(method), CrType(crtype), crsigma)


def resample(table, method="drizzle", crtype="median", crsigma=50.0, dlambda=250.0):
    return resample_cube(table["xpos"], table["ypos"], table["lambda"], table["data"],
                         table["stat"], table["dq"], options=options(method, crtype, crsigma), dlambda=dlambda)


# --------------------------------------------------------------------------- grid


def test_lround_is_half_away_from_zero():
    assert [lround(v) for v in (0.5, 1.5, 2.5, -0.5, -2.5, 2.4999)] == [1, 2, 3, -1, -3, 2]


def test_grid_sizes_and_wcs_follow_eso():
    x = np.array([10.25, 12.75], np.float32)  # range 2.5 -> lround 3 -> 4 spaxels
    y = np.array([-3.0, -1.4], np.float32)  # range 1.6 -> 3 spaxels
    lam = np.array([5000.4, 9000.0], np.float32)  # 3999.6 / 250 -> ceil 16 -> 17 planes
    grid = make_grid(x, y, lam, 250.0)
    assert (grid.nx, grid.ny, grid.nz) == (4, 3, 17)
    header = grid.header_wcs()
    assert header["CTYPE1"] == header["CTYPE2"] == "PIXEL"
    assert header["CUNIT1"] == "pixel" and header["CUNIT3"] == "Angstrom"
    assert header["CRVAL1"] == 10.25 and header["CRVAL2"] == -3.0
    assert header["CRVAL3"] == float(np.float32(5000.4)) == 5000.39990234375
    assert header["CD3_3"] == 250.0 and header["CD1_1"] == header["CD2_2"] == 1.0
    assert header["CRPIX1"] == header["CRPIX2"] == header["CRPIX3"] == 1.0
    assert all(header[k] == 0.0 for k in ("CD1_2", "CD2_1", "CD1_3", "CD2_3", "CD3_1", "CD3_2"))
    np.testing.assert_allclose(grid.wavelengths()[[0, -1]], [5000.39990234375, 9000.39990234375])


def test_grid_rejects_empty_table():
    with pytest.raises(MergeError, match="empty"):
        make_grid(np.array([], np.float32), np.array([], np.float32), np.array([], np.float32), 250.0)


def test_pixgrid_keeps_table_order_and_clamps_to_the_edge():
    grid = CubeGrid(nx=2, ny=1, nz=1, crval1=0.0, crval2=0.0, crval3=5000.0, cd3=250.0)
    x = np.array([1.2, 0.1, 5.0, -3.0, 0.9], np.float32)  # 5.0 and -3.0 lie outside: clamped
    zeros = np.zeros(5, np.float32)
    pix = build_pixgrid(grid, x, zeros, zeros + 5000, zeros, zeros, np.zeros(5, np.uint32))
    assert pix.offsets.tolist() == [0, 2, 5]
    assert pix.order.tolist() == [1, 3, 0, 2, 4]



@pytest.mark.parametrize("threads", [2, 3, 7])
def test_pixgrid_of_several_tables_is_the_same_sorted_by_several_threads(threads):
    """The threads split the rows into consecutive runs (inside tables too); every row must land
    where one thread puts it, the data divided by its table's divisor."""
    rng = np.random.default_rng(4)
    grid = CubeGrid(nx=6, ny=5, nz=3, crval1=0.0, crval2=0.0, crval3=5000.0, cd3=250.0)
    tables = []
    for nrow in (37, 0, 120, 5):
        tables.append(SimpleNamespace(
            xpos=rng.uniform(-1, 7, nrow).astype(np.float32), ypos=rng.uniform(-1, 6, nrow).astype(np.float32),
            lambda_=rng.uniform(4900, 5600, nrow).astype(np.float32), data=rng.normal(size=nrow).astype(np.float32),
            stat=rng.uniform(1, 2, nrow).astype(np.float32), dq=rng.integers(0, 3, nrow).astype(np.uint32)))
    parts = list(zip(tables, (1.0, 2.0, 0.7, 3.0)))
    for first, last in ((0, 4), (1, 3)):
        serial = build_pixgrid_from_tables(grid, parts, first, last, threads=1)
        shared = build_pixgrid_from_tables(grid, parts, first, last, threads=threads)
        assert serial.offsets[-1] > 0
        for name in ("offsets", "order", "xpos", "ypos", "lbda", "data", "stat", "dq"):
            np.testing.assert_array_equal(getattr(shared, name), getattr(serial, name), err_msg=name)
    whole = build_pixgrid_from_tables(grid, parts, threads=threads)
    rows = np.concatenate([np.arange(len(t.xpos)) for t in tables])
    table_of = np.repeat(np.arange(len(tables)), [len(t.xpos) for t in tables])
    divisor = np.array([d for _, d in parts])[table_of[whole.order]]
    data = np.concatenate([t.data for t in tables])[whole.order]
    np.testing.assert_array_equal(whole.data, (data.astype(np.float64) / divisor).astype(np.float32))
    assert sorted(whole.order.tolist()) == list(range(len(rows)))


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("method", METHODS)
def test_constant_field_stays_constant(method):
    table = muse_like_table(seed=3)
    table["data"][:] = 123.5
    table["stat"][:] = 2.0
    cube = resample(table, method=method, crtype="median", crsigma=5.0, dlambda=250.0)
    finite = np.isfinite(cube.data)
    assert finite.mean() > 0.9
    np.testing.assert_allclose(cube.data[finite], 123.5, rtol=2e-6)
    assert cube.ncosmic == 0  # a flat field has nothing above the median


def test_nearest_takes_the_closest_row_and_the_first_on_ties():
    # spaxel centres at x = -1 and 0; in spaxel 1 rows 1 and 2 are equally close
    x = np.array([0.45, 0.2, -0.2, -1.0], np.float32)
    y = np.array([0.0, 0.0, 0.0, 0.0], np.float32)
    lam = np.array([5000.0, 5000.0, 5000.0, 5000.0], np.float32)
    data = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    dq = np.array([0, 1 << 8, 0, 0], np.uint32)
    cube = resample_cube(x, y, lam, data, data * 10, dq, options=options("nearest", crsigma=0), dlambda=250.0)
    assert cube.grid.nx == 2
    # nearest ignores DQ when choosing, then the flagged row makes the voxel NaN
    assert np.isnan(cube.data[0, 0, 1]) and cube.dq[0, 0, 1] == 1 << 8
    assert cube.data[0, 0, 0] == 4.0 and cube.stat[0, 0, 0] == 40.0


def test_drizzle_weights_are_overlap_fractions():
    # spaxel centres x = 0, 1, 2; A on spaxel 0, B 0.25 px right of spaxel 1, C on spaxel 2
    x = np.array([0.0, 1.25, 2.0], np.float32)
    y = np.zeros(3, np.float32)
    lam = np.full(3, 6000.0, np.float32)
    data = np.array([10.0, 20.0, 40.0], np.float32)
    stat = np.array([1.0, 1.0, 1.0], np.float32)
    cube = resample_cube(x, y, lam, data, stat, np.zeros(3, np.uint32), options=options("drizzle", crsigma=0),
                         dlambda=250.0)
    # overlaps: spaxel 0 gets A fully (B is 1.25 away: none); spaxel 1 gets
    # B by 0.75 (A and C 1 away: none); spaxel 2 gets B by 0.25 and C fully
    assert cube.data[0, 0, 0] == pytest.approx(10.0)
    assert cube.data[0, 0, 1] == pytest.approx(20.0) and cube.stat[0, 0, 1] == pytest.approx(1.0)
    assert cube.data[0, 0, 2] == pytest.approx((0.25 * 20 + 40) / 1.25)
    assert cube.stat[0, 0, 2] == pytest.approx((0.25 ** 2 + 1) / 1.25 ** 2)


def test_empty_voxels_are_nan_and_missing_data():
    x = np.array([0.0, 4.0], np.float32)
    zeros = np.zeros(2, np.float32)
    cube = resample_cube(x, zeros, zeros + 6000, zeros + 1, zeros + 1, np.zeros(2, np.uint32),
                         options=options("linear", crsigma=0), dlambda=250.0)
    assert cube.grid.nx == 5
    assert np.isnan(cube.data[0, 0, 2]) and cube.dq[0, 0, 2] == EURO3D_MISSDATA
    assert np.isfinite(cube.data[0, 0, [0, 1, 3, 4]]).all()


# --------------------------------------------------------------------------- cosmic rays


def test_cpl_median_of_even_counts_is_the_midpoint():
    rng = np.random.default_rng(5)
    for n in (3, 4, 9, 400, 401, 1200, 1201):
        values = rng.normal(0, 1, n)
        assert median(values.copy(), n, np.empty(n + 100), 2.0) == pytest.approx(np.median(values), abs=0)


@pytest.mark.parametrize("crtype", CRTYPES)
def test_injected_cosmic_is_flagged_and_excluded(crtype):
    table = muse_like_table(seed=1)
    table["data"][:] = 1000.0 + np.random.default_rng(2).normal(0, 3, table["data"].size)
    table["stat"][:] = 9.0
    table["dq"][:] = 0
    hit = np.argmin(np.abs(table["lambda"] - 6000) + np.abs(table["ypos"] - np.median(table["ypos"]))
                    + np.abs(table["xpos"] - np.median(table["xpos"])))
    table["data"][hit] = 1e6
    clean = resample(table, method="drizzle", crtype=crtype, crsigma=0.0, dlambda=250.0)
    cube = resample(table, method="drizzle", crtype=crtype, crsigma=30.0, dlambda=250.0)
    assert cube.pixel_dq[hit] & EURO3D_COSMICRAY
    assert clean.ncosmic == 0 and not (clean.pixel_dq & EURO3D_COSMICRAY).any()
    assert np.nanmax(cube.data) < 1100 < np.nanmax(clean.data)


def test_iraf_statistics_flag_a_steep_first_plane():
    # the standard error of the mean is tiny for high S/N: with a spectrum falling
    # by 30 % per plane the first plane (neighbours only on the red side) goes
    table = muse_like_table(seed=4)
    table["data"] = (1e5 * np.exp(-(table["lambda"] - 5000.0) / 700.0)).astype(np.float32)
    table["stat"][:] = 1e3
    table["dq"][:] = 0
    cube = resample(table, method="drizzle", crtype="iraf", crsigma=50.0, dlambda=250.0)
    first = table["lambda"] < 5125
    assert (cube.pixel_dq[first] & EURO3D_COSMICRAY).all()
    later = table["lambda"] > 5500
    assert np.mean(cube.pixel_dq[later] & EURO3D_COSMICRAY > 0) < 0.5
    # only rows of plane 2 within 0.625 A of the plane boundary still reach plane 1
    assert np.isnan(cube.data[0]).mean() > 0.5 > np.isnan(cube.data[3]).mean()


def test_white_light_is_the_mean_of_finite_planes():
    cube = np.array([[[1.0, np.nan]], [[3.0, np.nan]], [[np.nan, np.nan]]], np.float32)
    white = white_light(cube)
    assert white.dtype == np.float32
    assert white[0, 0] == 2.0 and np.isnan(white[0, 1])


def test_unknown_method_and_crtype_are_refused_by_the_parameters():
    with pytest.raises(ParameterError, match="resample: 'cubic' is not one of nearest, linear"):
        make_settings({"resample": "cubic"})
    with pytest.raises(ParameterError, match="crtype: 'sigclip' is not one of iraf, mean, median"):
        make_settings({"crtype": "sigclip"})


# --------------------------------------------------------------------------- ESO parity


def write_eso_pixtable(path, table):
    """Write the table as an ESO pixel table (one image extension per column)."""
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        header["HIERARCH ESO DRS MUSE PIXTABLE TYPE"] = "GEOFULL"
        header["OBJECT"] = "resample test"
        for key, column in (("X", "xpos"), ("Y", "ypos"), ("LAMBDA", "lambda")):
            header[f"HIERARCH ESO DRS MUSE PIXTABLE LIMITS {key} LOW"] = float(table[column].min())
            header[f"HIERARCH ESO DRS MUSE PIXTABLE LIMITS {key} HIGH"] = float(table[column].max())
    units = {"xpos": "pix", "ypos": "pix", "lambda": "Angstrom", "data": "count", "stat": "count**2"}
    hdus = [fits.PrimaryHDU(header=header)]
    for name in ("xpos", "ypos", "lambda", "data", "dq", "stat"):
        column = table[name].view(np.int32) if name == "dq" else table[name]
        hdu = fits.ImageHDU(column.reshape(-1, 1))
        hdu.header["EXTNAME"] = name
        if name in units:
            hdu.header["BUNIT"] = units[name]
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path, overwrite=True)


@pytest.fixture(scope="session")
def eso_table(tmp_path_factory):
    table = muse_like_table(seed=7, nstack=2, nrow=6, columns=10, lmax=6500.0)
    path = tmp_path_factory.mktemp("resample_eso") / "PIXTABLE_TEST.fits"
    write_eso_pixtable(path, table)
    path.with_suffix(".sof").write_text(f"{path} PIXTABLE_OBJECT\n")
    return table, path


COMBINATIONS = [(m, c, 50.0) for m in METHODS for c in CRTYPES] + [(m, "median", 0.0) for m in METHODS]


@pytest.mark.eso
@requires_esorex
@pytest.mark.parametrize("method,crtype,crsigma", COMBINATIONS)
def test_cube_equals_eso_make_cube(eso_table, tmp_path, method, crtype, crsigma):
    table, path = eso_table
    sigma = crsigma if crtype != "mean" else crsigma / 10  # mean/stdev needs a lower level to bite
    run = eso.run_esorex("muse_scipost_make_cube", path.with_suffix(".sof"), tmp_path, {
        "resample": method, "pixfrac": "1", "ld": 1, "rc": 1.25, "crtype": crtype, "crsigma": sigma,
        "dlambda": 250.0, "lambdamin": 4000.0, "lambdamax": 10000.0, "filter": "none"})
    assert run.returncode == 0, run.errors[-5:]
    with fits.open(run.product("DATACUBE_FINAL.fits")) as hdul:
        eso_data = hdul["DATA"].data.astype(np.float64)
        eso_stat = hdul["STAT"].data.astype(np.float64)
        eso_header = hdul["DATA"].header
    ours = resample(table, method=method, crtype=crtype, crsigma=sigma, dlambda=250.0)

    assert ours.data.shape == eso_data.shape
    wcs = ours.grid.header_wcs()
    assert {k: eso_header[k] for k in wcs} == dict(wcs)
    assert np.isfinite(eso_data).sum() > 0.5 * eso_data.size
    assert_bit_identical(eso_data.astype(np.float32), ours.data, f"{method}/{crtype} DATA")
    assert_bit_identical(eso_stat.astype(np.float32), ours.stat, f"{method}/{crtype} STAT")
    if crsigma > 0:
        found = re.search(r"(\d+) output CR pixels", run.log)
        assert found and ours.ncosmic == int(found.group(1))


@pytest.mark.eso
@requires_esorex
@pytest.mark.parametrize("method", ["drizzle", "lanczos"])
def test_nonfinite_good_rows_spoil_their_neighbourhood_like_eso(eso_table, tmp_path, method):
    # ESO adds data x weight for every row of the 3 x 3 x 3 cells, weight 0 or not,
    # so one NaN row with DQ 0 turns its whole neighbourhood NaN
    table = {k: v.copy() for k, v in eso_table[0].items()}
    hit = np.argmin(np.abs(table["lambda"] - 6000) + np.abs(table["ypos"] - np.median(table["ypos"]))
                    + np.abs(table["xpos"] - np.median(table["xpos"])))
    table["data"][hit] = np.nan
    table["dq"][hit] = 0
    path = tmp_path / "PIXTABLE_NAN.fits"
    write_eso_pixtable(path, table)
    path.with_suffix(".sof").write_text(f"{path} PIXTABLE_OBJECT\n")
    run = eso.run_esorex("muse_scipost_make_cube", path.with_suffix(".sof"), tmp_path / "eso", {
        "resample": method, "pixfrac": "1", "ld": 1, "crtype": "median", "crsigma": 0.0,
        "dlambda": 250.0, "lambdamin": 4000.0, "lambdamax": 10000.0, "filter": "none"})
    assert run.returncode == 0, run.errors[-5:]
    eso_data = fits.getdata(run.product("DATACUBE_FINAL.fits"), "DATA")
    ours = resample(table, method=method, crsigma=0.0, dlambda=250.0)
    assert np.isnan(ours.data).sum() == 27
    np.testing.assert_array_equal(np.isnan(ours.data), np.isnan(eso_data))
