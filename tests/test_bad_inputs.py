"""Issue 9: broken inputs and outputs fail loudly, precisely and cleanly.

Every case runs the recipe on a copy of the mini set with one file broken, and checks
the exact message and that the output directory holds no product afterwards -- or,
where ESO skips the one IFU and carries on, that the run succeeds without that IFU
and that the summary and both product headers list it.  ``test_eso_decides_the_same``
runs ESO's muse_twilight on some of the same broken sets to confirm the choice
between "skip the IFU" and "fail".
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from musetwilight import recipe
from musetwilight.errors import InputError, MergeError, ParameterError
from musetwilight.params import PARAMETERS
from musetwilight.tools import eso

MINI_IFUS = (1, 2, 3)


def _present(skipped) -> dict[int, str]:
    """Skip reasons of the IFUs the mini set has (the others are always skipped)."""
    return {ifu: skip.reason for ifu, skip in skipped.items() if ifu in MINI_IFUS}


@pytest.fixture(scope="module")
def mini(simulated_set):
    return simulated_set(seed=1)


def _lines(sim) -> list[tuple[str, str]]:
    return [tuple(line.rsplit(" ", 1)) for line in Path(sim.sof).read_text().splitlines() if line.strip()]


def _sof(directory: Path, lines) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sof = directory / "input.sof"
    sof.write_text("".join(f"{path} {tag}\n" for path, tag in lines))
    return sof


def _replace(lines, tag: str, new_path, index: int = 0):
    out, seen = [], 0
    for path, t in lines:
        if t == tag:
            if seen == index:
                path = str(new_path)
            seen += 1
        out.append((path, t))
    return out


def _edited(src, dst: Path, edit) -> Path:
    """A copy of FITS file ``src`` changed by ``edit(hdulist)``."""
    with fits.open(src) as hdul:
        copy = fits.HDUList([hdu.copy() for hdu in hdul])
    copy = edit(copy) or copy
    copy.writeto(dst, overwrite=True)
    return dst


def _file(sim, tag: str, index: int = 0) -> Path:
    return Path([p for p, t in _lines(sim) if t == tag][index])


def _variant(sim, tmp_path: Path, tag: str, edit, indices=(0,)) -> Path:
    """SOF of the mini set with the files of ``tag`` (by index) edited."""
    lines = _lines(sim)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for index in indices:
        src = _file(sim, tag, index)
        lines = _replace(lines, tag, _edited(src, tmp_path / f"broken_{index}_{src.name}", edit), index)
    return _sof(tmp_path / "sof", lines)


def _products(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _fails(sof, message: str, tmp_path: Path, error=InputError, settings=None):
    """The run raises ``error`` with exactly ``message`` and leaves the output directory empty."""
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        recipe.run(sof, settings, out)
    assert str(info.value) == message
    assert _products(out) == []


def _skips(sof, tmp_path: Path, expected: dict[int, str]):
    """The run succeeds without the IFUs in ``expected`` (number -> exact reason)."""
    out = tmp_path / "out"
    result = recipe.run(sof, None, out, workers=2)
    assert {ifu: skip.reason for ifu, skip in result.skipped_ifus.items() if ifu in MINI_IFUS} == expected
    assert result.ifus("failed") == sorted(expected)
    absent = {ifu: f"IFU {ifu:2d} is not in this set (no TRACE_TABLE or WAVECAL_TABLE for it)"
              for ifu in range(1, 25) if ifu not in MINI_IFUS}
    assert {ifu: skip.reason for ifu, skip in result.skipped_ifus.items() if ifu not in MINI_IFUS} == absent
    assert result.ifus("absent") == sorted(absent)
    listed = ",".join(map(str, sorted(expected)))
    not_in_set = ",".join(str(ifu) for ifu in range(1, 25) if ifu not in MINI_IFUS)
    assert _products(out) == [".musetwilight-products.json", "DATACUBE_SKYFLAT.fits", "TWILIGHT_CUBE.fits"]
    for name in _products(out)[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # astropy only warns on a checksum mismatch
            with fits.open(out / name, checksum=True) as hdul:
                assert hdul[0].header["MUSETWILIGHT SKIPPED"] == listed
                assert hdul[0].header["MUSETWILIGHT ABSENT"] == not_in_set
                assert all("CHECKSUM" in hdu.header and "DATASUM" in hdu.header for hdu in hdul)
                hdul.readall()
    return result


# --------------------------------------------------------------------------- set of frames

def test_unknown_tag(mini, tmp_path):
    extra = tmp_path / "std.fits"
    extra.write_bytes(_file(mini, "MASTER_FLAT").read_bytes())
    sof = _sof(tmp_path, _lines(mini) + [(str(extra), "STD_FLUX_TABLE")])
    _fails(sof, f"{sof}, line 9: unknown tag 'STD_FLUX_TABLE' for {extra} (muse_twilight accepts SKYFLAT, "
                "ILLUM, MASTER_BIAS, MASTER_DARK, MASTER_FLAT, BADPIX_TABLE, TRACE_TABLE, WAVECAL_TABLE, "
                "GEOMETRY_TABLE, VIGNETTING_MASK)", tmp_path)


def test_fewer_than_three_skyflats(mini, tmp_path):
    sof = _sof(tmp_path, [(p, t) for p, t in _lines(mini) if p != str(_file(mini, "SKYFLAT", 2))])
    _fails(sof, "muse_twilight needs at least 3 SKYFLAT frames, found 2", tmp_path)


def test_two_illum(mini, tmp_path):
    sky = _file(mini, "SKYFLAT")
    sof = _sof(tmp_path, _lines(mini) + [(str(sky), "ILLUM"), (str(sky), "ILLUM")])
    _fails(sof, f"muse_twilight accepts at most 1 ILLUM frame, found 2: {sky}, {sky}", tmp_path)


def test_required_calibration_missing(mini, tmp_path):
    sof = _sof(tmp_path, [(p, t) for p, t in _lines(mini) if t != "TRACE_TABLE"])
    _fails(sof, "muse_twilight needs exactly 1 TRACE_TABLE frame, found 0", tmp_path)


def test_listed_file_does_not_exist(mini, tmp_path):
    sof = _sof(tmp_path, _replace(_lines(mini), "WAVECAL_TABLE", tmp_path / "nowhere.fits"))
    _fails(sof, f"{tmp_path / 'nowhere.fits'}: WAVECAL_TABLE file does not exist", tmp_path)


def test_file_that_is_not_fits(mini, tmp_path):
    text = tmp_path / "flat.fits"
    text.write_text("SIMPLE? no, this is a text file\n")
    sof = _sof(tmp_path, _replace(_lines(mini), "MASTER_FLAT", text))
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        recipe.run(sof, None, out)
    assert str(info.value).startswith(f"MASTER_FLAT {text}: not a readable FITS file (")
    assert _products(out) == []


@pytest.mark.parametrize("cut, message", [
    (-2880, "truncated FITS file: HDU 9 needs 4772288 bytes, the file has only 4772160"),
    (-1 - 4775040 // 2, "truncated FITS file: HDU 5 needs 2652608 bytes, the file has only 2387519"),
    (5760 + 100, "truncated or corrupt FITS file: 100 bytes after HDU 0 do not form a complete HDU"),
    (4000, "not a readable FITS file (Empty or corrupt FITS file)"),
])
def test_truncated_fits_file(mini, tmp_path, cut, message):
    data = _file(mini, "MASTER_BIAS").read_bytes()
    assert len(data) == 4775040
    truncated = tmp_path / "bias.fits"
    truncated.write_bytes(data[:cut])
    sof = _sof(tmp_path, _replace(_lines(mini), "MASTER_BIAS", truncated))
    _fails(sof, f"MASTER_BIAS {truncated}: {message}", tmp_path)


# --------------------------------------------------------------------------- per-IFU problems: skip

def test_raw_file_without_the_ifu_extension_skips_that_ifu(mini, tmp_path):
    sof = _variant(mini, tmp_path, "SKYFLAT", lambda h: fits.HDUList([x for x in h if x.name != "CHAN02"]),
                   indices=(1,))
    _skips(sof, tmp_path, {2: "Basic processing failed for IFU  2: no CHAN02 extension in the raw exposures"})


def test_no_ifu_in_every_raw_file(mini, tmp_path):
    def keep(h, name):
        return fits.HDUList([h[0]] + [x for x in h[1:] if x.name == name])
    lines = _lines(mini)
    for index, name in enumerate(("CHAN01", "CHAN02", "CHAN03")):
        src = _file(mini, "SKYFLAT", index)
        lines = _replace(lines, "SKYFLAT", _edited(src, tmp_path / f"{index}.fits",
                                                   lambda h, name=name: keep(h, name)), index)
    sof = _sof(tmp_path, lines)
    names = ", ".join(f"{tmp_path}/{k}.fits" for k in range(3))
    _fails(sof, f"no IFU is present (as a CHANnn extension) in every raw exposure: {names}", tmp_path)


def test_bias_chip_mismatch_in_one_ifu_skips_it(mini, tmp_path):
    def chip(h):
        h["CHAN02.DATA"].header["HIERARCH ESO DET CHIP NAME"] = "OTHER"
    sof = _variant(mini, tmp_path, "MASTER_BIAS", chip)
    sky = _file(mini, "SKYFLAT")
    broken = tmp_path / f"broken_0_{_file(mini, 'MASTER_BIAS').name}"
    _skips(sof, tmp_path, {2: f"Basic processing failed for IFU  2: {sky}[CHAN02] vs MASTER_BIAS {broken}: CHIP "
                              "information does not match (('SIM02', 'ESO-CCD-SIM-02') / "
                              "('OTHER', 'ESO-CCD-SIM-02'))"})


def test_overscan_far_from_the_bias_skips_that_ifu(mini, tmp_path):
    def level(h):
        h["CHAN02.DATA"].header["HIERARCH ESO DRS MUSE OVSC1 MEAN"] = 3000.0
    sof = _variant(mini, tmp_path, "MASTER_BIAS", level)
    result = recipe.run(sof, None, None)
    reason = result.skipped_ifus[2].reason
    sky = _file(mini, "SKYFLAT")
    assert reason.startswith(f"Basic processing failed for IFU  2: {sky}[CHAN02]: overscan of quadrant 1 (")
    assert reason.endswith("differs from MASTER_BIAS (3000.000+/-3.123): very different overscan levels, "
                           "incompatible overscan parameters?")
    assert sorted(_present(result.skipped_ifus)) == [2]


def test_overscan_far_from_the_bias_in_every_ifu_fails(mini, tmp_path):
    def level(h):
        for ifu in (1, 2, 3):
            h[f"CHAN0{ifu}.DATA"].header["HIERARCH ESO DRS MUSE OVSC1 MEAN"] = 3000.0
    sof = _variant(mini, tmp_path, "MASTER_BIAS", level)
    out = tmp_path / "out"
    with pytest.raises(MergeError) as info:
        recipe.run(sof, None, out)
    message = str(info.value)
    assert message.startswith("no IFU could be reduced: Basic processing failed for IFU  1: ")
    assert message.count("very different overscan levels") == 3
    assert _products(out) == []


@pytest.mark.parametrize("tag", ["MASTER_BIAS", "MASTER_FLAT"])
def test_nan_or_inf_in_a_master_skips_that_ifu(mini, tmp_path, tag):
    def poison(h):
        h["CHAN02.DATA"].data[10, 100] = np.nan
        h["CHAN02.DATA"].data[20, 30] = np.inf
        h["CHAN02.DATA"].data[0, 0] = np.nan
        h["CHAN02.DQ"].data[0, 0] = 1 << 14  # flagged: allowed
    sof = _variant(mini, tmp_path, tag, poison)
    broken = tmp_path / f"broken_0_{_file(mini, tag).name}"
    _skips(sof, tmp_path, {2: f"Basic processing failed for IFU  2: {tag} {broken} [CHAN02]: 2 unflagged "
                              "pixel(s) are NaN or inf (first at x=101, y=11)"})


def test_nan_in_every_ifu_of_a_master_fails(mini, tmp_path):
    def poison(h):
        for ifu in (1, 2, 3):
            h[f"CHAN0{ifu}.STAT"].data[5, 7] = np.nan
    sof = _variant(mini, tmp_path, "MASTER_FLAT", poison)
    broken = tmp_path / f"broken_0_{_file(mini, 'MASTER_FLAT').name}"
    reasons = "; ".join(f"Basic processing failed for IFU  {ifu}: MASTER_FLAT {broken} [CHAN0{ifu}]: 1 unflagged "
                        "pixel(s) are NaN or inf (first at x=8, y=6)" for ifu in (1, 2, 3))
    out = tmp_path / "out"
    with pytest.raises(MergeError) as info:
        recipe.run(sof, None, out)
    assert str(info.value) == f"no IFU could be reduced: {reasons} (IFUs 4-24 are not in this set)"
    assert _products(out) == []


def test_ifu_saturated_everywhere_is_skipped(mini, tmp_path):
    def saturate(h):
        h["CHAN02"].data[:] = 65535
    sof = _variant(mini, tmp_path, "SKYFLAT", saturate, indices=(0, 1, 2))
    broken = tmp_path / f"broken_0_{_file(mini, 'SKYFLAT').name}"
    _skips(sof, tmp_path, {2: f"Basic processing failed for IFU  2: {broken}[CHAN02]: no usable pixel in the "
                              "vertical overscan of quadrant 1 (all flagged: saturated or bad)"})


def test_ifu_with_saturated_data_section_is_skipped(mini, tmp_path):
    def saturate(h):  # data sections only; pre- and overscans keep their bias level
        data = h["CHAN02"].data
        for rows in (slice(32, 160), slice(224, 352)):
            for cols in (slice(32, 288), slice(352, 608)):
                data[rows, cols] = 65535
    sof = _variant(mini, tmp_path, "SKYFLAT", saturate, indices=(0, 1, 2))
    _skips(sof, tmp_path, {2: "Basic processing failed for IFU  2: the combined image has no unflagged pixel "
                              "(saturated or bad in every exposure), nothing to interpolate from"})


def test_trace_leaving_the_ccd_drops_the_slice_with_a_warning(mini, tmp_path, caplog):
    def shift(h):
        table = h["CHAN02"].data
        table["tc1_00"][5] -= 400
        table["tc2_00"][5] -= 400
    sof = _variant(mini, tmp_path, "TRACE_TABLE", shift)
    result = recipe.run(sof, None, None, workers=1)
    assert _present(result.skipped_ifus) == {}
    faulty = [r.getMessage() for r in caplog.records if "faulty polynomial" in r.getMessage()]
    assert len(faulty) == 1 and faulty[0].startswith("slice  6 of IFU 2: faulty polynomial detected at y=1 (")


# --------------------------------------------------------------------------- global problems: fail fast

@pytest.mark.parametrize("tag, key, value, message", [
    ("MASTER_BIAS", "HIERARCH ESO DET BINX", 2,
     "{raw}[CHAN01] vs MASTER_BIAS {broken}: binning does not match (ESO DET BINX 1 / 2)"),
    ("MASTER_FLAT", "HIERARCH ESO DET BINY", 2,
     "{raw}[CHAN01] vs MASTER_FLAT {broken}: binning does not match (ESO DET BINY 1 / 2)"),
    ("MASTER_BIAS", "HIERARCH ESO DET READ CURID", 3,
     "{raw}[CHAN01] vs MASTER_BIAS {broken}: read-out mode does not match (1 / 3)"),
    ("MASTER_FLAT", "HIERARCH ESO INS MODE", "WFM-AO-N",
     "{raw}[CHAN01] vs MASTER_FLAT {broken}: instrument modes do not match (WFM-NOAO-N / WFM-AO-N)"),
])
def test_calibration_setup_mismatch_for_all_ifus_fails_before_any_work(mini, tmp_path, tag, key, value, message):
    def edit(h):
        h[0].header[key] = value
    sof = _variant(mini, tmp_path, tag, edit)
    broken = tmp_path / f"broken_0_{_file(mini, tag).name}"
    expected = message.format(raw=_file(mini, "SKYFLAT"), broken=broken)
    _fails(sof, expected + " (IFU 1; no IFU can be processed, all 3 IFUs fail this check)", tmp_path)


def test_calibration_ccd_size_differs(mini, tmp_path):
    def crop(h):
        for hdu in h[1:]:
            hdu.data = hdu.data[:-2]
    sof = _variant(mini, tmp_path, "MASTER_BIAS", crop)
    broken = tmp_path / f"broken_0_{_file(mini, 'MASTER_BIAS').name}"
    _fails(sof, f"{_file(mini, 'SKYFLAT')}[CHAN01] vs MASTER_BIAS {broken}: MASTER_BIAS size 512x254 differs "
                "from the trimmed raw size 512x256 (IFU 1; no IFU can be processed, all 3 IFUs fail this check)",
           tmp_path)


def test_flat_read_out_mode_differs_is_only_a_warning(mini, tmp_path, caplog):
    def edit(h):
        h[0].header["HIERARCH ESO DET READ CURID"] = 3
    sof = _variant(mini, tmp_path, "MASTER_FLAT", edit)
    result = recipe.run(sof, None, None, workers=1)
    assert _present(result.skipped_ifus) == {}
    warned = [r.getMessage() for r in caplog.records if "read-out mode does not match" in r.getMessage()]
    assert len(warned) == 9  # 3 exposures x 3 IFUs, as ESO
    broken = tmp_path / f"broken_0_{_file(mini, 'MASTER_FLAT').name}"
    assert warned[0] == (f"{_file(mini, 'SKYFLAT')}[CHAN01] vs MASTER_FLAT {broken}: read-out mode does not "
                         "match (1 / 3)")


def test_geometry_table_with_a_slice_missing(mini, tmp_path):
    def drop(h):
        rows = h[1].data
        h[1].data = rows[~((rows["SubField"] == 2) & (rows["SliceCCD"] == 17))]
    sof = _variant(mini, tmp_path, "GEOMETRY_TABLE", drop)
    broken = tmp_path / f"broken_0_{_file(mini, 'GEOMETRY_TABLE').name}"
    _fails(sof, f"GEOMETRY_TABLE {broken}: IFU 2 has 47 instead of 48 slices (slice(s) 17 missing)", tmp_path)


@pytest.mark.parametrize("corner, reason", [
    (True, "could not copy 200x200 quadrant with masked region into new 41x38 mask"),
    (False, "no masked quadrant found, cannot adapt 400x400 mask to 41x38 cube size"),
])
def test_vignetting_mask_larger_than_twice_the_cube(mini, tmp_path, corner, reason):
    mask = tmp_path / "vign.fits"
    values = np.zeros((400, 400), np.uint8)
    values[:30, :30] = corner
    fits.PrimaryHDU(values).writeto(mask)
    sof = _sof(tmp_path, _lines(mini) + [(str(mask), "VIGNETTING_MASK")])
    _fails(sof, f"VIGNETTING_MASK {mask}: {reason} (the cube of IFUs 1, 2, 3 will be about 39x36 spaxels; "
                "the mask must not be larger than twice that)", tmp_path)


def test_vignetting_mask_that_is_not_an_integer_image(mini, tmp_path):
    mask = tmp_path / "vign.fits"
    fits.PrimaryHDU(np.zeros((40, 40), np.float32)).writeto(mask)
    sof = _sof(tmp_path, _lines(mini) + [(str(mask), "VIGNETTING_MASK")])
    _fails(sof, f"{mask}: VIGNETTING_MASK must be an integer image, found BITPIX = -32", tmp_path)


# --------------------------------------------------------------------------- parameters

def _invalid_value(parameter):
    if parameter.type is bool:
        return "maybe", "is not a boolean (TRUE or FALSE)"
    if parameter.type is int:
        return "1.5x", "is not an integer"
    if parameter.type is float:
        return "inf", "is not a finite number"
    if parameter.choices:
        return "bogus", f"is not one of {', '.join(parameter.choices)}"
    return 42, "is not a string"


@pytest.mark.parametrize("parameter", PARAMETERS, ids=[p.name for p in PARAMETERS])
def test_each_invalid_parameter_fails_before_any_work(mini, tmp_path, parameter):
    value, problem = _invalid_value(parameter)
    _fails(mini.sof, f"parameter {parameter.name}: {value!r} {problem}", tmp_path, ParameterError,
           {parameter.name: value})


@pytest.mark.parametrize("lambdamin, lambdamax", [(7000.0, 7000.0), (8000.0, 6000.0)])
def test_lambdamax_not_above_lambdamin(mini, tmp_path, lambdamin, lambdamax):
    _fails(mini.sof, f"lambdamax ({lambdamax}) must be larger than lambdamin ({lambdamin})", tmp_path,
           ParameterError, {"lambdamin": lambdamin, "lambdamax": lambdamax})


def test_wavelength_cut_that_leaves_no_pixels(mini, tmp_path):
    _fails(mini.sof, "After cutting to 10500.00..10900.00 Angstrom in wavelength no pixels for cube "
                     "reconstruction are left!",
           tmp_path, MergeError, {"lambdamin": 10500, "lambdamax": 10900})


# --------------------------------------------------------------------------- outputs

_RUN_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    from musetwilight import recipe
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit raise EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
    try:
        recipe.run(sys.argv[1], None, sys.argv[2])
    except OSError as err:
        print("OSError", err.errno, err)
        sys.exit(3)
""")


def _old_products(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    old = {"DATACUBE_SKYFLAT.fits": b"old cube", "TWILIGHT_CUBE.fits": b"old twilight"}
    for name, content in old.items():
        (out / name).write_bytes(content)
    return old


def test_full_disk_file_size_limit_leaves_old_products_untouched(mini, tmp_path):
    out = tmp_path / "out"
    old = _old_products(out)
    completed = subprocess.run([sys.executable, "-c", _RUN_LIMITED, str(mini.sof), str(out), "100000"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 3, completed.stderr[-2000:]
    assert completed.stdout.startswith(f"OSError None {out}: ran out of space while writing the products (file size "
                                       "limit exceeded, "), completed.stdout  # EFBIG, via astropy
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # no temporary file, lock or record left


def _cli(sof, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musetwilight", "run", f"--output-dir={out}", str(sof)],
                          capture_output=True, text=True, timeout=300)


def test_cli_summary_lists_skipped_ifus_and_exit_status_tells_failure(mini, tmp_path):
    """What automation sees: exit 0 with the skipped IFUs listed, or exit 1 with the reason."""
    def chip(h):
        h["CHAN02.DATA"].header["HIERARCH ESO DET CHIP NAME"] = "OTHER"
    ok = _cli(_variant(mini, tmp_path / "chip", "MASTER_BIAS", chip), tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "IFUs: reduced 1, 3; absent (not in the set) 4-24; failed 2\n" in ok.stdout  # as the headers say
    assert "Basic processing failed for IFU  2: " in ok.stderr

    def drop(h):
        rows = h[1].data
        h[1].data = rows[rows["SubField"] != 3]
    failed = _cli(_variant(mini, tmp_path / "geo", "GEOMETRY_TABLE", drop), tmp_path / "failed")
    assert failed.returncode == 1
    assert "IFU 3 has 0 instead of 48 slices (slice(s) 1, 2, 3," in failed.stderr
    assert _products(tmp_path / "failed") == []


# --------------------------------------------------------------------------- ESO decides

ESO_CASES = {
    # case: (edited tag, edit, ESO exit status, the IFU ESO skips or None when it fails)
    "bias_chip_ifu2": ("MASTER_BIAS", lambda h: h["CHAN02.DATA"].header.set("HIERARCH ESO DET CHIP NAME", "X"),
                       0, 2),
    "flat_mode": ("MASTER_FLAT", lambda h: h[0].header.set("HIERARCH ESO INS MODE", "WFM-AO-N"), 255, None),
    "bias_readout": ("MASTER_BIAS", lambda h: h[0].header.set("HIERARCH ESO DET READ CURID", 3), 255, None),
    "ovsc_ifu2": ("MASTER_BIAS", lambda h: h["CHAN02.DATA"].header.set("HIERARCH ESO DRS MUSE OVSC1 MEAN", 3000.0),
                  0, 2),
}


@pytest.mark.eso
@pytest.mark.parametrize("case", sorted(ESO_CASES))
def test_eso_decides_the_same(mini, tmp_path, case):
    if eso.esorex_path() is None:
        pytest.skip("esorex (ESO MUSE pipeline) is not installed")
    tag, edit, status, skipped = ESO_CASES[case]
    sof = _variant(mini, tmp_path, tag, edit)
    run = eso.run_esorex("muse_twilight", sof, tmp_path / "eso")
    assert run.returncode == status
    failed = [text for text in run.warnings if "Basic processing failed for IFU" in text]
    if skipped is None:
        assert len(failed) == 3
        with pytest.raises(InputError):
            recipe.run(sof, None, None)
    else:
        assert len(failed) == 1 and f"Basic processing failed for IFU  {skipped}:" in failed[0]
        assert sorted(_present(recipe.run(sof, None, None).skipped_ifus)) == [skipped]
