"""Product comparison: identical sets agree, perturbations are found where they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from musetwilight.shells import cli
from musetwilight.tools.compare import PRODUCT_NAMES as PRODUCTS
from musetwilight.tools.compare import Tolerances, compare_arrays, compare_products, relative_difference


def image_hdu(data: np.ndarray, extname: str) -> fits.ImageHDU:
    hdu = fits.ImageHDU(data)
    hdu.header["EXTNAME"] = extname  # ESO keeps lower case (astropy's name= would not)
    return hdu


def cube_wcs(header: fits.Header) -> None:
    for axis, (ctype, cunit, crval, cd) in enumerate((("PIXEL", "pixel", -150.0, 1.0), ("PIXEL", "pixel", -140.0, 1.0),
                                                      ("AWAV", "Angstrom", 5000.0, 250.0)), start=1):
        header[f"CTYPE{axis}"] = ctype
        header[f"CUNIT{axis}"] = cunit
        header[f"CRVAL{axis}"] = crval
        header[f"CRPIX{axis}"] = 1.0
        header[f"CD{axis}_{axis}"] = cd


def write_products(directory: Path, seed: int = 1) -> Path:
    """A small DATACUBE_SKYFLAT + TWILIGHT_CUBE pair in the product layout."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (5, 12, 10)
    cube = rng.uniform(500, 1500, shape).astype(np.float32)
    cube[:, :, 0] = np.nan  # empty column as in real cubes
    primary = fits.PrimaryHDU()
    primary.header["HIERARCH ESO PRO CATG"] = "DATACUBE_SKYFLAT"
    for ifu in (1, 2):
        primary.header[f"HIERARCH ESO QC TWILIGHT{ifu} INTFLUX"] = 1.234567e6 * ifu
        primary.header[f"HIERARCH ESO DRS MUSE FLAT FLUX SKY{ifu}"] = 1.234567e6 * ifu
        primary.header[f"HIERARCH ESO QC TWILIGHT{ifu} INPUT1 NSATURATED"] = 0
    data = image_hdu(cube, "DATA")
    cube_wcs(data.header)
    stat = image_hdu(cube / 10, "STAT")
    cube_wcs(stat.header)
    white = image_hdu(np.nanmean(cube[:, :, 1:], axis=0), "white")
    fits.HDUList([primary, data, stat, white]).writeto(directory / "DATACUBE_SKYFLAT.fits")
    smooth = (1 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    tw_primary = fits.PrimaryHDU()
    tw_primary.header["HIERARCH ESO PRO CATG"] = "TWILIGHT_CUBE"
    tw_data = image_hdu(smooth, "DATA")
    cube_wcs(tw_data.header)
    dq = image_hdu(np.zeros(shape[1:], np.int32), "white_div_global_DQ")
    fits.HDUList([tw_primary, tw_data, image_hdu(smooth.mean(axis=0), "white_global_fit"), dq]).writeto(
        directory / "TWILIGHT_CUBE.fits")
    (directory / "esorex.log").write_text("not compared\n")
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return write_products(tmp_path_factory.mktemp("ref"))


def copy_set(reference: Path, target: Path) -> Path:
    shutil.copytree(reference, target)
    return target


def edit(path: Path, function) -> None:
    with fits.open(path, mode="update") as hdul:
        function(hdul)


def test_relative_difference_conventions():
    rel = relative_difference(np.array([2.0, 0.0, 0.0, -4.0]), np.array([2.5, 0.0, 1.0, -3.0]))
    np.testing.assert_array_equal(rel, [0.25, 0.0, np.inf, 0.25])
    diff = compare_arrays("x", np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0]), Tolerances())
    assert diff.max_rel == np.inf and diff.p99_rel == np.inf and diff.ndifferent == 2 and not diff.ok


def test_identical_sets_agree(reference, tmp_path, capsys):
    test = copy_set(reference, tmp_path / "test")
    report = compare_products(reference, test)
    assert report.ok and report.problems == []
    assert [f.name for f in report.files] == ["DATACUBE_SKYFLAT.fits", "TWILIGHT_CUBE.fits"]
    data = report.image("DATACUBE_SKYFLAT.fits", "DATA")
    assert data.shape == (5, 12, 10) and data.npix == 600 and data.nfinite_both == 540
    assert data.max_rel == 0.0 and data.ndifferent == 0 and data.nan_mismatch == 0
    cube = report.files[0]
    assert cube.ref_extensions == ["PRIMARY", "DATA", "STAT", "white"]
    # 2 x 3 primary keywords + 5 x 3 WCS keywords in each of DATA and STAT
    assert cube.keywords_compared == 6 + 30 and cube.keyword_diffs == []
    assert cli.main(["compare", str(reference), str(test), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "within tolerances" in printed and "white_div_global_DQ" in printed
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True


def test_perturbed_extension_is_reported(reference, tmp_path, capsys):
    test = copy_set(reference, tmp_path / "test")

    def scale(hdul):
        hdul["DATA"].data = (hdul["DATA"].data * np.float32(1 + 3e-4)).astype(np.float32)
    edit(test / "TWILIGHT_CUBE.fits", scale)
    report = compare_products(reference, test)
    assert not report.ok
    diff = report.image("TWILIGHT_CUBE.fits", "DATA")
    assert diff.median_rel == pytest.approx(3e-4, rel=2e-3)
    assert diff.p99_rel == pytest.approx(3e-4, rel=2e-3) and diff.ndifferent == diff.npix == 600
    assert len(diff.problems) == 1 and "median relative difference 3.0" in diff.problems[0]
    others = [d for f in report.files for d in f.images if (f.name, d.extension) != ("TWILIGHT_CUBE.fits", "DATA")]
    assert len(others) == 5 and all(d.max_rel == 0 for d in others)
    assert report.problems == [f"TWILIGHT_CUBE.fits: DATA: {diff.problems[0]}"]
    assert cli.main(["compare", str(reference), str(test), "--json", str(tmp_path / "r.json")]) == 1
    assert "1 problem(s)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["ok"] is False and saved["files"][1]["images"][0]["median_rel"] == pytest.approx(3e-4, rel=2e-3)
    # looser limits from the command line accept it
    assert cli.main(["compare", str(reference), str(test), "--rtol-median", "1e-3", "--rtol-p99", "1e-3"]) == 0


def test_few_outliers_pass_median_and_p99_but_not_max(reference, tmp_path):
    test = copy_set(reference, tmp_path / "test")

    def outliers(hdul):
        hdul["DATA"].data[2, 5, 3:5] *= np.float32(1.5)
    edit(test / "DATACUBE_SKYFLAT.fits", outliers)
    report = compare_products(reference, test)
    diff = report.image("DATACUBE_SKYFLAT.fits", "DATA")
    assert report.ok and diff.ndifferent == 2 and diff.max_rel == pytest.approx(0.5, rel=1e-6)
    assert diff.worst_pixel in ((2, 5, 3), (2, 5, 4))
    strict = compare_products(reference, test, Tolerances(rtol_max=0.1))
    assert not strict.ok and "maximum relative difference 5.0" in strict.problems[0]


def test_nan_pattern_mismatch(reference, tmp_path):
    test = copy_set(reference, tmp_path / "test")

    def holes(hdul):
        hdul["STAT"].data[0, :6, 4] = np.nan  # 6 of 600 pixels: 1 %
        hdul["DATA"].data[1, 3, 0] = 7.0  # a finite value where ref has NaN
    edit(test / "DATACUBE_SKYFLAT.fits", holes)
    report = compare_products(reference, test)
    stat = report.image("DATACUBE_SKYFLAT.fits", "STAT")
    data = report.image("DATACUBE_SKYFLAT.fits", "DATA")
    assert stat.nan_mismatch == 6 and stat.nan_mismatch_frac == pytest.approx(0.01)
    assert data.nan_mismatch == 1 and data.nan_mismatch_frac == pytest.approx(1 / 600)
    assert data.max_rel == 0 and data.nfinite_both == 540  # the new finite pixel is not compared
    assert not stat.ok and "NaN pattern differs in 6 of 600" in stat.problems[0]
    assert not data.ok  # 1/600 = 1.7e-3 > 1e-3
    looser = compare_products(reference, test, Tolerances(nan_mismatch_frac=2e-3))
    assert looser.image("DATACUBE_SKYFLAT.fits", "DATA").ok
    assert not looser.image("DATACUBE_SKYFLAT.fits", "STAT").ok


def test_keyword_and_structure_differences(reference, tmp_path):
    test = copy_set(reference, tmp_path / "test")

    def keywords(hdul):
        hdul[0].header["HIERARCH ESO QC TWILIGHT1 INTFLUX"] *= 1 + 1e-4
        hdul[0].header["HIERARCH ESO DRS MUSE FLAT FLUX SKY2"] *= 1 + 1e-6  # within 1e-5
        del hdul[0].header["HIERARCH ESO QC TWILIGHT2 INTFLUX"]
        hdul[0].header["HIERARCH ESO DRS MUSE EXTRA"] = "x"
        hdul["DATA"].header["CRVAL1"] = -149.0
        hdul["DATA"].header["CTYPE3"] = "WAVE"
    edit(test / "DATACUBE_SKYFLAT.fits", keywords)

    def structure(hdul):
        del hdul["white_global_fit"]
        hdul["DATA"].data = hdul["DATA"].data[:, :, :9]
    edit(test / "TWILIGHT_CUBE.fits", structure)
    (test / "DATACUBE_SKYFLAT.fits").rename(test / "renamed.fits")
    shutil.copy(test / "renamed.fits", test / "DATACUBE_SKYFLAT.fits")
    report = compare_products(reference, test)
    cube = report.files[0]
    diffs = {k.keyword: k for k in cube.keyword_diffs}
    assert diffs["ESO QC TWILIGHT1 INTFLUX"].rel_diff == pytest.approx(1e-4, rel=1e-6)
    assert diffs["ESO QC TWILIGHT1 INTFLUX"].problem.startswith("relative difference 1.000e-04")
    assert diffs["ESO DRS MUSE FLAT FLUX SKY2"].problem == ""  # reported, within tolerance
    assert diffs["ESO QC TWILIGHT2 INTFLUX"].problem == "missing in test"
    assert diffs["ESO DRS MUSE EXTRA"].problem == "missing in reference"
    assert diffs["CRVAL1"].rel_diff == pytest.approx(1 / 150) and diffs["CRVAL1"].extension == "DATA"
    assert diffs["CTYPE3"].problem == "different value"
    twilight = report.files[1]
    assert "extension white_global_fit missing in test" in twilight.problems
    assert "DATA: shape 5x12x10 vs 5x12x9" in twilight.problems
    assert report.missing_in_ref == ["renamed.fits"] and len(report.problems) == 7
    text = report.format()
    assert "MISSING" not in text and "only in test" in text and "FAIL" in text


def test_keyword_set_differences(reference, tmp_path):
    """Names in one file only and types that differ fail; our own MUSETWILIGHT keywords and the
    order are reported only."""
    test = copy_set(reference, tmp_path / "test")

    def keywords(hdul):
        header = hdul[0].header
        header["HIERARCH ESO QC TWILIGHT1 INPUT1 NSATURATED"] = 0.0  # integer -> real
        header["OBSERVER"] = "someone"
        header["HIERARCH MUSETWILIGHT ABSENT"] = "3,4"
        value = header["HIERARCH ESO PRO CATG"]
        del header["HIERARCH ESO PRO CATG"]
        header["HIERARCH ESO PRO CATG"] = value  # now last: out of order
        del hdul["STAT"].header["CUNIT2"]
    edit(test / "DATACUBE_SKYFLAT.fits", keywords)
    report = compare_products(reference, test)
    cube = report.files[0]
    found = {(k.extension, k.keyword): (k.ref, k.test, k.problem) for k in cube.keyword_set_diffs}
    assert found == {
        ("PRIMARY", "ESO QC TWILIGHT1 INPUT1 NSATURATED"): ("integer", "real",
                                                           "type integer in reference, real in test"),
        ("PRIMARY", "OBSERVER"): ("-", "string", "only in test"),
        ("PRIMARY", "MUSETWILIGHT ABSENT"): ("-", "string", "")}
    assert cube.keyword_order == ["PRIMARY: ESO PRO CATG"]
    assert sorted(p.split(": ")[-1] for p in report.problems) == [
        "missing in test", "only in test", "type integer in reference, real in test"]  # CUNIT2 once, as WCS
    text = report.format()
    assert "keyword sets: 3 difference(s), order differs (PRIMARY: ESO PRO CATG)" in text
    assert "MUSETWILIGHT ABSENT: ref - test string  (musetwilight only)" in text
    assert compare_products(reference, copy_set(reference, tmp_path / "same")).files[0].keyword_set_diffs == []


def test_missing_product_and_single_files(reference, tmp_path):
    test = copy_set(reference, tmp_path / "test")
    (test / "TWILIGHT_CUBE.fits").unlink()
    report = compare_products(reference, test)
    assert report.missing_in_test == ["TWILIGHT_CUBE.fits"] and not report.ok
    single = compare_products(reference / "DATACUBE_SKYFLAT.fits", test / "DATACUBE_SKYFLAT.fits")
    assert single.ok and len(single.files) == 1
    assert cli.main(["compare", str(reference), str(tmp_path / "nowhere")]) == 1


# ----------------------------------------------------------------------------- ESO products

@pytest.fixture(scope="module")
def eso_products(eso_twilight, tmp_path_factory):
    """ESO's products of the default mini set (shared run, conftest.py), a copy of them, and
    ESO's products with resample=linear."""
    first = eso_twilight({})
    linear = eso_twilight({}, {"resample": "linear"})
    assert first.returncode == 0 and linear.returncode == 0, (first.errors, linear.errors)
    copy = tmp_path_factory.mktemp("eso_copy")
    for name in PRODUCTS:
        shutil.copy(first.product(name), copy / name)
    return {"first": first.output_dir, "linear": linear.output_dir, "copy": copy}


@pytest.mark.eso
def test_eso_products_equal_themselves(eso_products):
    """ESO's products compared with a copy: every extension and keyword equal, exit 0."""
    assert cli.main(["compare", str(eso_products["first"]), str(eso_products["copy"])] +
                    [f"--file={name}" for name in PRODUCTS]) == 0
    report = compare_products(eso_products["first"], eso_products["copy"], names=PRODUCTS)
    assert report.ok, report.format()
    assert [f.name for f in report.files] == list(PRODUCTS)
    assert report.files[0].ref_extensions == ["PRIMARY", "DATA", "STAT", "white"]
    assert report.files[1].ref_extensions[:4] == ["PRIMARY", "DATA", "white_global_fit", "white_div_global"]
    assert all(d.ndifferent == 0 and d.nan_mismatch == 0 for f in report.files for d in f.images)
    # QC of 3 IFUs x 3 inputs x 6 + master statistics + WCS
    assert report.files[0].keywords_compared > 100 and report.files[0].keyword_diffs == []
    assert report.image("DATACUBE_SKYFLAT.fits", "DATA").nfinite_both > 0


@pytest.mark.eso
def test_eso_resampling_change_found_in_pixels_not_in_qc(eso_products):
    """resample=linear vs drizzle: the cubes differ, the QC (computed before resampling) do not."""
    report = compare_products(eso_products["first"], eso_products["linear"], names=PRODUCTS)
    data = report.image("DATACUBE_SKYFLAT.fits", "DATA")
    assert data.ndifferent > data.nfinite_both // 2 and data.max_rel > 1e-3
    assert not report.ok
    assert [k.keyword for k in report.files[0].keyword_diffs] == []
    assert all(f.problems == [] for f in report.files)  # same extensions, shapes and WCS
