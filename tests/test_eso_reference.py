"""ESO's own muse_twilight reduces every kind of simulated mini set cleanly.

These runs are the reference the comparison tests build on: exit 0, both
products written, and no warning except "Calibrations could not be loaded"
for exactly the IFUs that were not simulated.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from astropy.io import fits

pytestmark = pytest.mark.eso

VARIANTS = {
    "default": {},
    "illum": {"illum": True},
    "vignetting": {"vignetting": True},
    "dark_badpix": {"dark": True, "badpix": True},
    "nfm": {"mode": "NFM-AO-N"},
    "ao_saturate": {"mode": "WFM-AO-E", "saturate": True},
}
_MISSING = re.compile(r"Calibrations could not be loaded for IFU\s+(\d+): TRACE_TABLE WAVECAL_TABLE$")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eso_reduces_mini_set_without_warnings(variant, simulated_set, eso_twilight):
    options = VARIANTS[variant]
    sim = simulated_set(**options)
    run = eso_twilight(options)
    assert run.returncode == 0, run.log[-3000:]
    assert run.errors == []
    skipped = {int(m[1]) for w in run.warnings if (m := _MISSING.search(w))}
    assert skipped == set(range(1, 25)) - set(sim.ifus)
    others = [w for w in run.warnings if not _MISSING.search(w)]
    assert others == []
    cube = fits.open(run.product("DATACUBE_SKYFLAT.fits"))
    twilight = fits.open(run.product("TWILIGHT_CUBE.fits"))
    names = [h.name for h in twilight]
    if variant in ("vignetting", "nfm"):
        assert {"vign_fit", "white_cor"} <= set(names)
        fit = twilight["vign_fit"].data
        ny, nx = fit.shape
        # the vignetting fit really worked (ESO silently skips it if its polynomial fit fails):
        # WFM lamp-flat vignetting is corrected upwards in the bottom-left corner, NFM sky
        # vignetting downwards at the top
        if variant == "vignetting":
            assert fit[: ny // 4, : nx // 4].max() > 1.05 and fit.min() >= 1.0
        else:
            assert fit[-4:].min() < 0.9 and fit.max() <= 1.0
    else:
        assert "vign_fit" not in names
    grid = sim.truth()["cube_grid"]
    assert cube["DATA"].data.shape == (17, grid["ny"], grid["nx"])
    assert np.isfinite(twilight["DATA"].data).all()


@pytest.mark.parametrize("variant", ["default", "vignetting", "dark_badpix"])
def test_eso_intflux_matches_injected_flux(variant, simulated_set, eso_twilight):
    """QC TWILIGHTm INTFLUX (ESO's per-IFU pixel-table sum) equals the simulator's noise-free
    expectation: bias, overscan, gain, dark, flat (with its lamp vignetting), trace and
    wavelength solution all agree."""
    options = VARIANTS[variant]
    sim = simulated_set(**options)
    header = fits.getheader(eso_twilight(options).product("DATACUBE_SKYFLAT.fits"))
    truth = sim.truth()["ifus"]
    for ifu in sim.ifus:
        measured = header[f"ESO QC TWILIGHT{ifu} INTFLUX"]
        assert measured == pytest.approx(truth[str(ifu)]["expected_intflux"], rel=2e-3)


def test_eso_nfm_takes_ifu23_flux_for_ifu24(simulated_set, eso_twilight):
    sim = simulated_set(mode="NFM-AO-N")
    assert {23, 24} <= set(sim.ifus)
    header = fits.getheader(eso_twilight({"mode": "NFM-AO-N"}).product("DATACUBE_SKYFLAT.fits"))
    assert header["ESO DRS MUSE FLAT FLUX SKY24"] == header["ESO DRS MUSE FLAT FLUX SKY23"]
    truth = sim.truth()["ifus"]
    # the simulated IFU 24 really is darker (vignetted at the top of the NFM field)
    assert truth["24"]["expected_intflux"] < 0.95 * truth["23"]["expected_intflux"]


def test_eso_counts_the_injected_saturated_pixels_and_masks_the_notch(simulated_set, eso_twilight):
    options = VARIANTS["ao_saturate"]
    sim = simulated_set(**options)
    run = eso_twilight(options)
    counted = {(int(m[2]), int(m[1])): int(m[3]) for m in re.finditer(
        r"Raw exposure (\d+) in IFU (\d+) \((\d+) of \d+ pixels saturated\)", run.log)}
    truth = sim.truth()["ifus"]
    for ifu in sim.ifus:
        assert [counted[(ifu, k + 1)] for k in range(3)] == truth[str(ifu)]["nsaturated"]
        assert truth[str(ifu)]["nsaturated"][0] > 0
    assert "WFM-AO-E mode: marking NaD region (5755.0..6008.0 Angstrom)" in run.log


def test_eso_scibasic_gives_intermediate_products_of_a_simulated_set(simulated_set, eso_recipe):
    """The harness also runs muse_scibasic (SKYFLAT retagged OBJECT) for ESO's per-IFU
    pre-processed image and pixel table."""
    sim = simulated_set()
    run = eso_recipe("muse_scibasic", {}, {"nifu": 1, "saveimage": True, "skylines": "", "crop": False},
                     retag={"SKYFLAT": "OBJECT"})
    assert run.returncode == 0 and run.warnings == []
    with fits.open(run.product("OBJECT_RED_0001-01.fits")) as red:
        assert red["DATA"].data.shape == (256, 512)
    with fits.open(run.product("PIXTABLE_OBJECT_0001-01.fits")) as pixtable:
        lam = pixtable["lambda"].data
        assert lam.min() < 5000 and lam.max() > 9000
    assert sim.ifus[0] == 1
