"""Tests of the smooth illumination / vignetting model (DATACUBE_SKYFLAT -> TWILIGHT_CUBE).

The ESO comparisons feed the same DATACUBE_SKYFLAT to ESO's muse_twilight
(through MUSE_TWILIGHT_SKIP, which makes the recipe start from an existing
cube) and to ``smooth.postprocess``; this isolates this stage from the
reconstruction before it.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from parity import TWILIGHT_RTOL

from musetwilight import recipe
from musetwilight.core import smooth
from musetwilight.errors import FitError, InputError
from musetwilight.io import formats, products
from musetwilight.params import make_settings
from musetwilight.tools.eso import esorex_path, run_esorex

TOLERANCE = TWILIGHT_RTOL  # maximum relative difference to ESO per extension (why: tests/parity.py)

WCS = dict(CTYPE1="PIXEL", CTYPE2="PIXEL", CUNIT1="pixel", CUNIT2="pixel", CD1_1=1.0, CD1_2=0.0,
           CD2_1=0.0, CD2_2=1.0, CRPIX1=1.0, CRPIX2=1.0, CRVAL1=-20.0, CRVAL2=-18.0,
           CTYPE3="AWAV", CUNIT3="Angstrom", CD3_3=250.0, CRPIX3=1.0, CRVAL3=5000.0,
           CD1_3=0.0, CD2_3=0.0, CD3_1=0.0, CD3_2=0.0)


def synthetic_cube(nx=48, ny=44, nz=4, mode="WFM-NOAO-N", seed=1, vx=15, vy=13):
    """A twilight-like cube: smooth field, slice stripes, noise, empty spaxels, vignetting."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx]
    u, v = (x - nx / 2) / nx, (y - ny / 3) / ny
    cube = np.empty((nz, ny, nx), np.float32)
    for k in range(nz):
        field = 1000 * (1 + 0.3 * k) * (1 + 0.08 * u - 0.16 * v ** 2 + 0.08 * u ** 2)
        cube[k] = field * (1 + 0.01 * rng.standard_normal((ny, nx)))
    cube[:, ::6, :] *= 0.95
    if mode.startswith("NFM"):  # sky flats are darker at the top in NFM
        cube[:, ny - vy:, :] *= np.linspace(1, 0.7, vy)[None, :, None]
    else:  # lamp-flat vignetting: the corner comes out brighter in WFM
        yy, xx = np.mgrid[0:vy, 0:vx]
        cube[:, :vy, :vx] *= (1.25 - 0.2 * xx / vx - 0.25 * yy / vy + 0.05 * (xx / vx) ** 2)[None]
    cube[:, 10:12, 0:3] = np.nan
    cube[:, 20, 25] = np.nan
    cube[:, 5, 30] = 0.0
    cube[:, ny - 1, nx - 4:] = np.nan
    return cube


def write_skyflat(path, cube, mode="WFM-NOAO-N", white=True):
    """Write ``cube`` as ESO's DATACUBE_SKYFLAT (DATA, STAT, white)."""
    primary = fits.Header()
    primary["OBJECT"] = "SKYFLAT"
    primary["HIERARCH ESO INS MODE"] = mode
    primary["HIERARCH ESO PRO CATG"] = "DATACUBE_SKYFLAT"
    primary["HIERARCH ESO QC TWILIGHT1 INTFLUX"] = 1.0e9
    primary["HIERARCH ESO DRS MUSE FLAT FLUX SKY1"] = 1.0e9
    primary["HIERARCH ESO DRS MUSE FLAT FLUX LAMP"] = 2.0e9
    data = fits.Header()
    data["EXTNAME"] = "DATA"
    data["OBJECT"] = "SKYFLAT (DATA)"
    data["BUNIT"] = "count"
    data.update(WCS)
    stat = data.copy()
    stat["EXTNAME"] = "STAT"
    stat["BUNIT"] = "(count)**2"
    hdus = [fits.PrimaryHDU(header=primary), fits.ImageHDU(cube, data),
            fits.ImageHDU(np.abs(cube) * 0.01, stat)]
    if white:
        image, empty = smooth.collapse(cube)
        image[empty] = np.nan
        header = fits.Header({"EXTNAME": "white", "BUNIT": "count", "OBJECT": "SKYFLAT (white)"})
        header.update({k: v for k, v in WCS.items() if not k.endswith("3") and "3_" not in k})
        hdus.append(fits.ImageHDU(image, header))
    fits.HDUList(hdus).writeto(path, overwrite=True)


def corner_mask(shape, corner_shape, corner="bottom left"):
    mask = np.zeros(shape, np.uint8)
    cy, cx = corner_shape
    rows = slice(0, cy) if corner.startswith("bottom") else slice(shape[0] - cy, shape[0])
    cols = slice(0, cx) if corner.endswith("left") else slice(shape[1] - cx, shape[1])
    mask[rows, cols] = 1
    return mask


def run_ours(cube_path, params, mask_path=None):
    sky = formats.read_datacube_skyflat(cube_path)
    mask = formats.read_vignetting_mask(mask_path).mask if mask_path else None
    result = smooth.postprocess(sky.cube, make_settings(params), sky.primary_header["ESO INS MODE"],
                                white=sky.white, vignetting_mask=mask)
    return result, products.twilight_cube_hdulist(result, sky.primary_header, sky.data_header)


def assert_matches_eso(eso_path, ours: fits.HDUList):
    """Same extensions, masks, finite spaxels and WCS; values within TOLERANCE."""
    with fits.open(eso_path) as eso:
        assert [h.name for h in ours] == [h.name for h in eso]
        for theirs in eso[1:]:
            mine = ours[theirs.name]
            if theirs.data is None:
                assert mine.data is None, theirs.name
                continue
            assert mine.data.shape == theirs.data.shape, theirs.name
            if theirs.name.endswith("_DQ"):
                np.testing.assert_array_equal(mine.data != 0, theirs.data != 0, err_msg=theirs.name)
                continue
            a, b = mine.data.astype(float), theirs.data.astype(float)
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=theirs.name)
            both = np.isfinite(a) & np.isfinite(b)
            rel = np.abs(a[both] - b[both]) / np.maximum(np.abs(b[both]), 1e-30)
            assert rel.max(initial=0) <= TOLERANCE, (theirs.name, rel.max())
            for key in theirs.header:
                if key.startswith(("CTYPE", "CUNIT", "CRPIX", "CRVAL", "CD")) or key in ("BUNIT", "OBJECT"):
                    assert mine.header.get(key) == theirs.header[key], (theirs.name, key)


# --------------------------------------------------------------------------
# building blocks


def test_white_light_mask_dilates_but_leaves_the_border_columns_undilated():
    white = np.ones((6, 12), np.float32)
    white[2, 6] = np.nan
    white[4, 0] = 0.0  # empty spaxel in the first column
    mask = smooth.white_light_mask(white)
    assert mask[:, 0].all() and mask[:, -1].all()
    np.testing.assert_array_equal(np.nonzero(mask[2, 1:-1])[0] + 1, [4, 5, 6, 7, 8])
    # CPL_BORDER_NOP: column 1 keeps the undilated value, column 2 sees column 0
    assert not mask[4, 1] and mask[4, 2] and not mask[4, 3]
    assert mask.sum() == 2 * 6 + 5 + 1


def test_adapt_vignetting_mask_pastes_the_most_masked_quadrant_into_its_corner():
    mask = corner_mask((20, 24), (4, 5), "top right")
    mask[0, 0] = 1  # a few pixels elsewhere do not win
    adapted = smooth.adapt_vignetting_mask(mask, 15, 16)
    assert adapted.shape == (15, 16)
    assert adapted.sum() == 20
    assert adapted[-4:, -5:].all()
    with pytest.raises(InputError, match="no masked quadrant"):
        smooth.adapt_vignetting_mask(np.zeros((10, 10)), 8, 8)
    with pytest.raises(InputError, match="could not copy"):
        smooth.adapt_vignetting_mask(corner_mask((40, 40), (3, 3)), 10, 10)


def test_nfm_mask_covers_one_row_more_than_asked_and_falls_back_to_22():
    assert smooth.nfm_vignetting_mask(40, 7, 5).sum(axis=1).tolist() == [0] * 34 + [7] * 6
    for out_of_range in (0, -3, 40, 99):
        assert smooth.nfm_vignetting_mask(40, 7, out_of_range)[:, 0].sum() == 23


def test_median_filter_equals_a_brute_force_masked_median():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(13, 11)).astype(np.float32)
    bad = rng.random((13, 11)) < 0.4
    bad[:8, :6] = True  # a region where some windows hold nothing
    out, outbad = smooth._median_filter(data, bad, 2, 3)
    for y in range(13):
        for x in range(11):
            window = (slice(max(0, y - 3), y + 4), slice(max(0, x - 2), x + 3))
            values = data[window][~bad[window]]
            if values.size == 0:
                assert outbad[y, x] and out[y, x] == 0
            else:
                assert not outbad[y, x]
                assert out[y, x] == pytest.approx(np.median(values.astype(float)), rel=1e-6, abs=1e-7)
    assert outbad.any()


def test_linear_filter_normalises_by_the_weights_of_good_pixels():
    data = np.full((9, 10), 3.0, np.float32)
    bad = np.zeros((9, 10), bool)
    bad[:, :5] = True
    data[bad] = 1e6  # must never leak into the output
    out, outbad = smooth._linear_filter(data, bad, smooth.gaussian_kernel(3.0))
    assert smooth.gaussian_kernel(3.0).shape == (7, 7)  # half width 3 (odd)
    np.testing.assert_allclose(out[:, 2:], 3.0, rtol=1e-6)
    assert outbad[:, :2].all() and not outbad[:, 2:].any()


def test_polynomial_fit_has_all_cross_terms_and_ignores_the_last_row_and_column():
    ny, nx = 30, 40
    y, x = np.mgrid[1:ny + 1, 1:nx + 1].astype(float)
    truth = 1 + 0.01 * x - 0.02 * y + 1e-4 * x * x * y - 2e-6 * x * x * y * y + 3e-4 * y * y
    image = truth.astype(np.float32)
    image[-1, :] = 1e4  # ESO's loop never reaches the last row/column
    image[:, -1] = -1e4
    bad = np.zeros((ny, nx), bool)
    bad[5:9, 7:20] = True
    image[bad] = np.nan
    fit = smooth.fit_polynomial_image(image, bad, 2, 2)
    np.testing.assert_allclose(fit, truth, rtol=2e-6)
    # orders are per dimension: x**2 * y**2 needs xorder = yorder = 2, not total degree 2
    fit11 = smooth.fit_polynomial_image(image, bad, 1, 1)
    assert np.abs(fit11 - truth).max() > 1e-2
    assert smooth.fit_polynomial_image(image, bad, 0, 0)[0, 0] == pytest.approx(
        truth[:-1, :-1][~bad[:-1, :-1]].mean(), rel=1e-6)
    few = np.ones((ny, nx), bool)
    few[0, :24] = False
    with pytest.raises(FitError, match="Too few data points 24 < 25"):
        smooth.fit_polynomial_image(image, few, 4, 4)
    with pytest.raises(FitError, match="singular"):  # 39 points on one row
        smooth.fit_polynomial_image(image, ~np.eye(1, nx, dtype=bool).repeat(ny, 0) & few | bad, 1, 1)


# --------------------------------------------------------------------------
# the stage


def test_postprocess_wfm_with_mask_gives_unit_mean_planes_and_a_vignetting_model():
    cube = synthetic_cube()
    mask = corner_mask((70, 80), (14, 16))
    result = smooth.postprocess(cube, make_settings(), "WFM-NOAO-N", vignetting_mask=mask)
    assert result.cube.dtype == np.float32 and np.isfinite(result.cube).all()
    np.testing.assert_allclose(result.cube.mean(axis=(1, 2), dtype=float), 1.0, atol=1e-6)
    assert result.extensions == ["white_global_fit", "white_div_global", "white_div_global_DQ",
                                 "white_div_global_excl_edges", "white_div_global_excl_edges_DQ",
                                 "vign_fit", "vign_fit_DQ", "white_cor", "white_cor_DQ"]
    vignetted = smooth.adapt_vignetting_mask(mask, *cube.shape[1:])
    assert (result.vign_fit[~vignetted] == 1).all()
    assert (result.vign_fit >= 1).all() and result.vign_fit[vignetted].max() > 1.1
    # the model flattens the brighter corner: white_cor is closer to 1 than white_div_global there
    inside = vignetted & ~result.white_cor_dq
    residual = np.abs(result.white_cor[inside] - 1).mean()
    assert residual < 0.5 * np.abs(result.white_div_global[inside] - 1).mean()
    assert not result.warnings


def test_postprocess_extension_sets_follow_mode_mask_and_edge_setting():
    cube = synthetic_cube(mode="NFM-AO-N")
    nfm = smooth.postprocess(cube, make_settings({"vignsmooth": "median"}), "NFM-AO-N")
    assert "white_div_global_excl_edges" not in nfm.extensions and "vign_fit" in nfm.extensions
    assert (nfm.vign_fit <= 1).all() and nfm.vign_fit[-5:].min() < 0.9
    np.testing.assert_allclose(nfm.cube.mean(axis=(1, 2), dtype=float), 1.0, atol=1e-6)
    wfm = smooth.postprocess(synthetic_cube(), make_settings(), "WFM-AO-E")
    assert wfm.extensions == ["white_global_fit", "white_div_global", "white_div_global_DQ"]
    noedge = smooth.postprocess(synthetic_cube(), make_settings({"vignmaskedges": 0}), "WFM-NOAO-N",
                                vignetting_mask=corner_mask((44, 48), (13, 15)))
    assert "white_div_global_excl_edges" not in noedge.extensions and "white_cor" in noedge.extensions


def test_failed_vignetting_polyfit_leaves_empty_extensions_as_eso():
    cube = synthetic_cube(vx=5, vy=4)
    result = smooth.postprocess(cube, make_settings(), "WFM-NOAO-N", vignetting_mask=corner_mask((44, 48), (4, 5)))
    assert result.vign_fit.size == 0 and result.vign_fit_dq is None
    assert result.extensions[-2:] == ["vign_fit", "white_cor"]
    assert any("polyfit failed" in w for w in result.warnings)
    hdul = products.twilight_cube_hdulist(result, fits.Header({"OBJECT": "SKYFLAT"}), fits.Header())
    assert hdul["vign_fit"].data is None and "QUALDATA" not in hdul["vign_fit"].header


def test_twilight_cube_layout_and_keywords(tmp_path):
    write_skyflat(tmp_path / "cube.fits", synthetic_cube(nz=3))
    result, hdul = run_ours(tmp_path / "cube.fits", {})
    assert [h.name for h in hdul] == ["PRIMARY", "DATA", "white_global_fit", "white_div_global",
                                      "white_div_global_DQ"]
    primary = hdul[0].header
    assert primary["ESO PRO CATG"] == "TWILIGHT_CUBE"
    assert "ESO QC TWILIGHT1 INTFLUX" not in primary
    assert primary["ESO DRS MUSE FLAT FLUX LAMP"] == 2.0e9 and "CRVAL3" not in primary
    assert hdul["DATA"].header["BITPIX"] == -32 and hdul["DATA"].header["CD3_3"] == 250.0
    fit_header = hdul["white_global_fit"].header
    assert fit_header["CRVAL1"] == -20.0 and "CRVAL3" not in fit_header and "CD3_1" not in fit_header
    assert hdul["white_div_global_DQ"].header["BITPIX"] == 32
    assert hdul["white_div_global"].header["QUALDATA"] == "white_div_global_DQ"
    sky = formats.read_datacube_skyflat(tmp_path / "cube.fits")
    kept = products.twilight_cube_hdulist(result, sky.primary_header, sky.data_header, drop_qc=False)
    assert kept[0].header["ESO QC TWILIGHT1 INTFLUX"] == 1.0e9


def test_missing_white_extension_is_collapsed_from_the_cube(tmp_path):
    cube = synthetic_cube(nz=3)
    write_skyflat(tmp_path / "with.fits", cube)
    write_skyflat(tmp_path / "without.fits", cube, white=False)
    assert formats.read_datacube_skyflat(tmp_path / "without.fits").white is None
    with_white, _ = run_ours(tmp_path / "with.fits", {})
    without, _ = run_ours(tmp_path / "without.fits", {})
    np.testing.assert_array_equal(with_white.white_div_global_dq, without.white_div_global_dq)
    good = ~with_white.white_div_global_dq
    np.testing.assert_array_equal(with_white.white_div_global[good], without.white_div_global[good])
    # the collapse leaves empty spaxels at 0 (as ESO's), the stored white image has NaN there
    assert without.white_div_global[20, 25] == 0 and np.isnan(with_white.white_div_global[20, 25])


def test_datacube_skyflat_reader_refuses_a_file_without_a_cube(tmp_path):
    fits.PrimaryHDU(np.zeros((3, 3))).writeto(tmp_path / "bad.fits")
    with pytest.raises(InputError, match="no DATA extension"):
        formats.read_datacube_skyflat(tmp_path / "bad.fits")


# --------------------------------------------------------------------------
# against ESO


eso = pytest.mark.eso
needs_esorex = pytest.mark.skipif(esorex_path() is None, reason="ESO esorex (muse_twilight) is not installed")

SKIP_CASES = {
    "wfm-nomask": ("WFM-NOAO-N", {}, None),
    "wfm-orders": ("WFM-NOAO-N", {"xorder": 4, "yorder": 1}, None),
    "wfm-order0": ("WFM-NOAO-N", {"xorder": 0, "yorder": 3}, None),
    "wfm-polyfit": ("WFM-NOAO-N", {}, "bottom left"),
    "wfm-gaussian": ("WFM-AO-N", {"vignsmooth": "gaussian", "vignxpar": 3, "vignypar": 6}, "bottom left"),
    "wfm-median": ("WFM-NOAO-E", {"vignsmooth": "median"}, "bottom left"),
    "wfm-median-even": ("WFM-NOAO-N", {"vignsmooth": "median", "vignxpar": 4}, "bottom left"),
    "wfm-noedges": ("WFM-NOAO-N", {"vignmaskedges": 0}, "bottom left"),
    "wfm-polyfit-fails": ("WFM-NOAO-N", {"vignsmooth": "polyfit"}, "tiny"),
    "nfm-polyfit": ("NFM-AO-N", {"vignnfmmask": 10}, None),
    "nfm-gaussian": ("NFM-AO-N", {"vignsmooth": "gaussian"}, "bottom left"),
    "nfm-median": ("NFM-AO-N", {"vignsmooth": "median", "vignnfmmask": 99}, None),
}


@eso
@needs_esorex
@pytest.mark.parametrize("case", sorted(SKIP_CASES))
def test_postprocessing_matches_eso_on_synthetic_cubes(case, tmp_path):
    mode, params, corner = SKIP_CASES[case]
    small = corner == "tiny"
    cube = synthetic_cube(mode=mode, vx=5 if small else 15, vy=4 if small else 13)
    write_skyflat(tmp_path / "cube.fits", cube, mode=mode)
    fits.PrimaryHDU().writeto(tmp_path / "raw.fits")
    sof = f"{tmp_path / 'raw.fits'} SKYFLAT\n"
    mask_path = None
    if corner:
        mask_path = tmp_path / "vignetting.fits"
        fits.PrimaryHDU(corner_mask((70, 80), (4, 5) if small else (14, 16))).writeto(mask_path)
        sof += f"{mask_path} VIGNETTING_MASK\n"
    (tmp_path / "in.sof").write_text(sof)
    run = run_esorex("muse_twilight", tmp_path / "in.sof", tmp_path / "eso", params,
                     env={recipe.SKIP_ENV: str(tmp_path / "cube.fits")})
    assert run.returncode == 0, run.errors
    result, ours = run_ours(tmp_path / "cube.fits", params, mask_path)
    assert_matches_eso(run.product("TWILIGHT_CUBE.fits"), ours)
    assert any("polyfit failed" in w for w in result.warnings) == small


@pytest.fixture(scope="module")
def simulated_runs(tmp_path_factory):
    """ESO muse_twilight on simulated mini sets (raw data -> both products), run once."""
    simulate = pytest.importorskip("musetwilight.tools.simulate")
    runs = {}
    for name, options, params in (("wfm-vign", {"vignetting": True}, {}),
                                  ("nfm", {"mode": "NFM-AO-N"}, {"vignsmooth": "median"})):
        base = tmp_path_factory.mktemp(name)
        data = simulate.simulate_dataset(base / "data", scale="mini", seed=0, **options)
        run = run_esorex("muse_twilight", data.sof, base / "eso", params)
        assert run.returncode == 0, run.errors
        masks = data.files.get("VIGNETTING_MASK") or [None]
        runs[name] = (run, params, masks[0])
    return runs


@eso
@needs_esorex
@pytest.mark.parametrize("name", ["wfm-vign", "nfm"])
def test_eso_skyflat_cube_gives_eso_twilight_cube(simulated_runs, name):
    run, params, mask = simulated_runs[name]
    _, ours = run_ours(run.product("DATACUBE_SKYFLAT.fits"), params, mask)
    assert_matches_eso(run.product("TWILIGHT_CUBE.fits"), ours)
