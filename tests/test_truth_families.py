"""The simulator's truth families (family=, brightness=): formulas in the data and in truth.json."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from musetwilight.tools import report
from musetwilight.tools.simulate import (
    CCD_TO_SKY,
    FAMILY_FORMULAS,
    LAYOUTS,
    FamilyField,
    build_instrument,
    field_from_truth,
    parse_family,
    pixel_maps,
    simulate_dataset,
)


def _flat_fielded(sim, ifu, k=0):
    """Bias-subtracted, gain-corrected, flat-fielded counts of SKYFLAT k (trimmed CCD of one IFU)."""
    raw = fits.getdata(sim.files["SKYFLAT"][k], f"CHAN{ifu:02d}").astype(float)
    bias = fits.getdata(sim.files["MASTER_BIAS"][0], f"CHAN{ifu:02d}.DATA").astype(float)
    flat = fits.getdata(sim.files["MASTER_FLAT"][0], f"CHAN{ifu:02d}.DATA").astype(float)
    header = fits.getheader(sim.files["SKYFLAT"][k], f"CHAN{ifu:02d}")
    out = np.zeros_like(bias)
    ny, nx = 128, 256
    for q, (rows, cols, rrows, rcols, ocols) in enumerate((
            (slice(0, ny), slice(0, nx), slice(32, 32 + ny), slice(32, 32 + nx), slice(32 + nx + 3, 32 + nx + 32)),
            (slice(0, ny), slice(nx, 2 * nx), slice(32, 32 + ny), slice(32 + nx + 64, 32 + 2 * nx + 64),
             slice(32 + nx + 32, 32 + nx + 61)),
            (slice(ny, 2 * ny), slice(nx, 2 * nx), slice(32 + ny + 64, 32 + 2 * ny + 64),
             slice(32 + nx + 64, 32 + 2 * nx + 64), slice(32 + nx + 32, 32 + nx + 61)),
            (slice(ny, 2 * ny), slice(0, nx), slice(32 + ny + 64, 32 + 2 * ny + 64), slice(32, 32 + nx),
             slice(32 + nx + 3, 32 + nx + 32))), start=1):
        level = np.median(raw[rrows, ocols], axis=1, keepdims=True)
        out[rows, cols] = (raw[rrows, rcols] - level - bias[rows, cols]) * header[f"ESO DET OUT{q} GAIN"]
    return out / flat


def test_default_sets_have_no_family_and_family_sets_document_theirs(simulated_set):
    plain = simulated_set(seed=3)
    assert "family" not in plain.truth() and "brightness" not in plain.truth()
    assert parse_family(None) == () and parse_family("ifu+stack") == ("ifu", "stack")
    sim = simulated_set(seed=3, family="ifu+stack")
    truth = sim.truth()
    fam = truth["family"]
    assert fam["components"] == ["ifu", "stack"]
    assert set(fam["formulas"]) == {"smooth", "ifu", "stack"}
    assert fam["formulas"]["ifu"] == FAMILY_FORMULAS["ifu"]
    assert len(fam["ifu_terms"]) == 24 and len(fam["stack_terms"]["5"]) == 4
    assert set(fam["layout"]["1"]) == {"yc", "y", "stacks"}
    model = field_from_truth(truth)
    assert isinstance(model, FamilyField) and model.components == ("ifu", "stack")
    # today's coefficients (same seed, same draws) plus the chromatic ones
    assert truth["field_illumination"]["coeffs"] == plain.truth()["field_illumination"]["coeffs"]
    assert set(fam["chroma"]) == {f"{p}{t}" for p in "bc" for t in ("10", "01", "20", "11", "02")}


def test_family_fields_are_in_the_sky_data(simulated_set):
    """Flat-fielded SKYFLAT of a family set / that of the default set = family field / default field."""
    plain = simulated_set(seed=2)
    sim = simulated_set(seed=2, family="ifu+stack")
    family, base = field_from_truth(sim.truth()), field_from_truth(plain.truth())
    inst = build_instrument(LAYOUTS["mini"], "WFM-NOAO-N", 2)
    for ifu in (1, 3):
        maps = pixel_maps(inst, ifu)
        ratio = _flat_fielded(sim, ifu) / _flat_fielded(plain, ifu)
        inside = maps.eso_mask & (maps.cover > 0.999) & (maps.lam > 5000) & (maps.lam < 9000)
        stack = (CCD_TO_SKY[maps.slice_index[inside]] - 1) // 12
        x, y, lam = maps.xpos[inside], maps.ypos[inside], maps.lam[inside]
        expected = family.sky(x, y, lam, ifu, stack) / base.sky(x, y)
        measured = ratio[inside]
        # both sets share every random draw but the family's: photon noise of two exposures
        assert np.median(measured / expected) == pytest.approx(1.0, abs=2e-3)
        assert np.std(measured / expected) < 0.02
        # and the family field varies: per-IFU and per-stack terms, chromatic terms
        assert np.std(expected) > 2e-3


def test_corner_and_edge_families_shape_the_vignetting(simulated_set):
    corner = simulated_set(seed=4, family="smooth+corner")
    model = corner.truth()["vignetting"]["model"]
    assert model["kind"] == "corner" and "shape" in model and "VIGNETTING_MASK" in corner.files
    vign = np.array(corner.truth()["vignetting"]["map"])
    assert vign.min() == pytest.approx(1 - model["depth"], abs=0.05) and vign.max() == 1.0
    edge = simulated_set(seed=4, family="smooth+edge", mode="NFM-AO-N")
    model = edge.truth()["vignetting"]["model"]
    assert model["kind"] == "top" and model["shape"] in ("quadratic", "linear", "cosine", "cubic", "exponential")
    vign = np.array(edge.truth()["vignetting"]["map"])
    assert vign[-1].mean() < 1 - 0.5 * model["depth"] and vign[0].min() == 1.0
    with pytest.raises(ValueError, match="NFM"):
        simulate_dataset(corner.out_dir.parent / "bad", family="edge")
    with pytest.raises(ValueError, match="unknown"):
        simulate_dataset(corner.out_dir.parent / "bad", family="smooth+wobble")


def test_brightness_scales_the_sky(simulated_set):
    plain = simulated_set(seed=5)
    dim = simulated_set(seed=5, brightness=0.25)
    assert dim.truth()["brightness"] == 0.25
    a, b = _flat_fielded(plain, 1), _flat_fielded(dim, 1)
    lit = a > 2000
    assert np.median(b[lit] / a[lit]) == pytest.approx(0.25, rel=0.01)


def test_expected_twilight_holds_the_per_ifu_flux_scaling(simulated_set):
    """The expected cube is the field times t_n g_n / FLUX_SKYn per IFU: its IFU levels follow the header."""
    from musetwilight import recipe

    sim = simulated_set(seed=2, family="ifu")
    run = recipe.run(sim.sof, None, None, workers=2)
    sky = run.datacube_skyflat
    expected = report.expected_twilight(sim.truth(), sky[0].header, sky["DATA"].header, sky["DATA"].data.shape)
    cube = expected["cube"]
    assert np.isfinite(cube[:, expected["ifu"] > 0]).all()
    assert set(np.unique(expected["ifu"])) == {0, 1, 2, 3}
    assert expected["ifu_boundary"].any() and expected["stack_boundary"].any()
    # the data follow it to the slice-efficiency level (no ILLUM: ~1 % per slice)
    field = np.isfinite(sky["white"].data) & (expected["ifu"] > 0)
    ratio = sky["DATA"].data / cube
    ratio /= np.nanmedian(ratio[:, field], axis=1)[:, None, None]
    assert np.nanmedian(np.abs(ratio[:, field] - 1)) < 0.01


def test_bayes_terms_is_least_squares_without_priors_and_shrinks_with_them():
    """The floor's estimator: flat priors give least squares, a prior shrinks by s2 / (s2 + noise / n)."""
    rng = np.random.default_rng(3)
    design = np.column_stack([np.ones(40), np.linspace(-1, 1, 40)])
    observed = design @ np.array([0.2, -0.05]) + rng.normal(0, 0.01, 40)
    flat = report.bayes_terms(design, np.zeros(2), observed, 1e-4)
    np.testing.assert_allclose(flat, np.linalg.lstsq(design, observed, rcond=None)[0], rtol=1e-12)
    one = np.ones((12, 1))
    values = rng.normal(0.003, 0.008, 12)
    shrunk = report.bayes_terms(one, np.array([1 / 0.002 ** 2]), values, 0.008 ** 2)
    weight = 0.002 ** 2 / (0.002 ** 2 + 0.008 ** 2 / 12)
    np.testing.assert_allclose(shrunk, [weight * values.mean()], rtol=1e-12)


def _cube_wcs(truth):
    grid = truth["cube_grid"]
    return fits.Header({"CRVAL1": grid["crval1"], "CRPIX1": 1.0, "CRVAL2": grid["crval2"], "CRPIX2": 1.0}), \
        (int(grid["ny"]), int(grid["nx"]))


def test_confusion_floor_is_zero_where_nothing_is_confused(simulated_set):
    """With ILLUM (slices levelled) and for a field without per-IFU or per-stack terms, the floor is 0."""
    for family, used_illum in (("stack", True), ("smooth", False)):
        truth = simulated_set(seed=4, family=family).truth()
        wcs, shape = _cube_wcs(truth)
        assert not report.confusion_floor(truth, wcs, shape, used_illum).any()


def test_confusion_floor_of_slice_stacks_is_one_level_per_stack(simulated_set):
    """Without ILLUM, the stack means of the slice efficiencies pass for stack levels: the floor is
    one constant per slice stack (its Bayes error), of the size of those means, not zero."""
    from musetwilight.tools.simulate import slice_membership, truth_geometry

    truth = simulated_set(seed=4, family="stack").truth()
    wcs, shape = _cube_wcs(truth)
    floor = report.confusion_floor(truth, wcs, shape, used_illum=False)
    ifu, stack = slice_membership(truth_geometry(truth), wcs["CRVAL1"], wcs["CRVAL2"], shape[1], shape[0], 4)
    whole = (ifu == ifu[..., :1]).all(axis=2) & (stack == stack[..., :1]).all(axis=2) & (ifu[..., 0] > 0)
    levels = []
    for n in np.unique(ifu[..., 0][whole]):
        for k in range(4):
            inside = whole & (ifu[..., 0] == n) & (stack[..., 0] == k)
            values = floor[inside]
            assert values.size > 10
            np.testing.assert_allclose(values, values[0], atol=1e-12)
            levels.append(values[0])
    levels = np.array(levels)
    eff = np.concatenate([np.asarray(e["slice_efficiency"]) for e in truth["ifus"].values()])
    stack_mean_scatter = np.std(np.log(eff)) / np.sqrt(12)
    assert 0.2 * stack_mean_scatter < np.std(levels) < 2 * stack_mean_scatter
