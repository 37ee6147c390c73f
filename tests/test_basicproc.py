"""Basic CCD processing: synthetic unit tests and parity with ESO's chain.

ESO's muse_twilight does not write its basic-processed images; muse_dark runs
the same muse_basicproc chain (bad pixels, saturation, overscans, trimming,
bias, gain, dark, flat when given) and writes the combination, so a median of
three copies of one raw exposure is that exposure's processed image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from musetwilight.core import basicproc
from musetwilight.core.basicproc import Calibrations
from musetwilight.core.cplmath import horner_long_double
from musetwilight.core.detector import layout_from_header, overscan_windows, trim
from musetwilight.core.images import MuseImage, RawImage
from musetwilight.core.overscan import dcr_flag, iterate_polyfit, vpoly_correct
from musetwilight.errors import InputError, OverscanError
from musetwilight.io.formats import read_badpix_table, read_muse_image, read_raw_ifu
from musetwilight.params import OverscanSpec, make_settings
from musetwilight.tools import eso

# ---------------------------------------------------------------------------
# synthetic MUSE-like data (tiny CCD, real layout rules)

NX = NY = 128  # data section per quadrant (DCR needs >= 128)
PRE = OVS = 32
RAW_W = 2 * (PRE + NX + OVS)
RAW_H = 2 * (PRE + NY + OVS)
GAINS = (1.10, 1.15, 1.05, 1.20)
LEVELS = (1000.0, 1010.0, 995.0, 1005.0)
RON = 3.0


def _det_header(ifu: int = 1) -> dict:
    h = {"EXTNAME": f"CHAN{ifu:02d}", "ESO DET BINX": 1, "ESO DET BINY": 1,
         "ESO DET READ CURID": 1, "ESO DET READ CURNAME": "SCI1RO",
         "ESO DET CHIP NAME": "Synth", "ESO DET CHIP ID": "S01", "ESO DET CHIP LIVE": True}
    ports = [(1, 1), (4096, 1), (4096, 4112), (1, 4112)]
    for q in range(4):
        p = f"ESO DET OUT{q + 1} "
        h.update({p + "X": ports[q][0], p + "Y": ports[q][1], p + "NX": NX, p + "NY": NY,
                  p + "PRSCX": PRE, p + "PRSCY": PRE, p + "OVSCX": OVS, p + "OVSCY": OVS,
                  p + "GAIN": GAINS[q], p + "RON": RON})
    return h


def _hdr(values: dict) -> fits.Header:
    header = fits.Header()
    for key, value in values.items():
        header[("HIERARCH " + key) if key.startswith("ESO ") else key] = value
    return header


def make_raw(rng, exptime=10.0, signal=20000.0, cosmics=True, saturate=True, slope=True):
    """One raw IFU: per-quadrant bias level with a vertical trend, noise, illumination."""
    H, W = RAW_H, RAW_W
    data = np.zeros((H, W))
    yy = np.arange(H)[:, None] / H
    for q in range(4):
        rows = slice(H // 2, H) if q in (2, 3) else slice(0, H // 2)
        cols = slice(W // 2, W) if q in (1, 2) else slice(0, W // 2)
        trend = (8.0 * yy[rows] + 3.0 * yy[rows] ** 2) if slope else 0.0
        data[rows, cols] = LEVELS[q] + trend
    ys, xs = np.mgrid[0:2 * NY, 0:2 * NX]
    illum = signal * exptime / 10.0 * (0.6 + 0.4 * np.cos(xs / 37.0) ** 2) * (1.0 - ys / (8.0 * NY))
    for q, (r0, c0) in enumerate([(PRE, PRE), (PRE, PRE + NX + 2 * OVS),
                                  (PRE + NY + 2 * OVS, PRE + NX + 2 * OVS), (PRE + NY + 2 * OVS, PRE)]):
        tr = slice(NY if q in (2, 3) else 0, (NY if q in (2, 3) else 0) + NY)
        tc = slice(NX if q in (1, 2) else 0, (NX if q in (1, 2) else 0) + NX)
        data[r0:r0 + NY, c0:c0 + NX] += rng.poisson(illum[tr, tc]) / GAINS[q]
    data += rng.normal(0.0, RON, data.shape)
    if cosmics:  # hits in the overscans and in the data
        for _ in range(12):
            y, x = rng.integers(0, H), rng.integers(PRE + NX, PRE + NX + 2 * OVS)
            data[y, x] += rng.uniform(200, 3000)
        for _ in range(6):
            y, x = rng.integers(PRE + NY, PRE + NY + 2 * OVS), rng.integers(PRE, W - PRE)
            data[y, x] += rng.uniform(200, 3000)
    if saturate:
        data[PRE + 5, PRE + 7] = 70000
        data[PRE + 60, PRE + NX + 2 * OVS + 9] = 65501
        data[PRE + 61, PRE + 11] = 0
    return np.clip(np.round(data), 0, 65535).astype(np.uint16)


def write_raw(path: Path, data: np.ndarray, exptime: float, ifu: int = 1, mode="WFM-NOAO-N",
              dateobs="2026-01-01T18:00:00.000"):
    primary = fits.PrimaryHDU(header=_hdr({
        "EXPTIME": exptime, "DATE-OBS": dateobs, "MJD-OBS": 61041.75, "ESO INS MODE": mode,
        "ESO DPR CATG": "CALIB", "ESO DPR TYPE": "FLAT,SKY", "ESO DPR TECH": "IFU",
        "ESO DET BINX": 1, "ESO DET BINY": 1, "ESO DET READ CURID": 1,
        "ESO DET READ CURNAME": "SCI1RO", "ESO TPL ID": "MUSE_wfm_cal_skyflat"}))
    ext = fits.ImageHDU(data=data, header=_hdr(_det_header(ifu)))
    ext.header["EXTNAME"] = f"CHAN{ifu:02d}"
    fits.HDUList([primary, ext]).writeto(path, overwrite=True)


def write_muse_image(path: Path, catg: str, data, dq, stat, extra: dict, bunit: str, ifu: int = 1):
    h = {"EXTNAME": f"CHAN{ifu:02d}", "ESO PRO CATG": catg, "PIPEFILE": path.name,
         "ESO DET BINX": 1, "ESO DET BINY": 1, "ESO DET READ CURID": 1,
         "ESO DET READ CURNAME": "SCI1RO", "ESO DET CHIP NAME": "Synth", "ESO DET CHIP ID": "S01",
         "ESO INS MODE": "WFM-NOAO-N"}
    h.update(extra)
    primary = fits.PrimaryHDU(header=_hdr(h))
    dhdr = fits.Header()
    dhdr["EXTNAME"] = "DATA"
    dhdr["BUNIT"] = bunit
    hdus = [primary, fits.ImageHDU(np.asarray(data, np.float32), dhdr, name="DATA"),
            fits.ImageHDU(np.asarray(dq, np.int32), name="DQ"),
            fits.ImageHDU(np.asarray(stat, np.float32), name="STAT")]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def make_calibrations(tmp: Path, rng, bias_level: bool, ovsc_params: dict | None = None):
    """MASTER_BIAS (adu; with or without the ~1000 adu level), MASTER_FLAT, MASTER_DARK, BADPIX_TABLE."""
    shape = (2 * NY, 2 * NX)
    level = np.zeros(shape)
    if bias_level:
        level[:NY, :NX], level[:NY, NX:] = LEVELS[0], LEVELS[1]
        level[NY:, NX:], level[NY:, :NX] = LEVELS[2], LEVELS[3]
    bias = level + rng.normal(0, 0.3, shape) + np.linspace(0, 2, shape[1])[None, :]
    bdq = np.zeros(shape, np.int32)
    bdq[40, 50] = 1 << 8
    bdq[:, 77] |= 1 << 14  # a bad column
    extra = {}
    for q in range(4):
        extra[f"ESO DRS MUSE OVSC{q + 1} MEAN"] = LEVELS[q] + 4.0
        extra[f"ESO DRS MUSE OVSC{q + 1} STDEV"] = RON
    for k, (name, value) in enumerate((ovsc_params or {}).items(), start=1):
        extra[f"ESO PRO REC1 PARAM{k} NAME"] = name
        extra[f"ESO PRO REC1 PARAM{k} VALUE"] = str(value)
    write_muse_image(tmp / "MASTER_BIAS.fits", "MASTER_BIAS", bias, bdq,
                     np.full(shape, 0.05) + rng.uniform(0, 0.01, shape), extra, "adu")
    flat = 1.0 + 0.05 * rng.normal(size=shape)
    flat[100:103, 200:202] = 0.0  # ESO leaves these undivided
    fdq = np.zeros(shape, np.int32)
    fdq[10:12, 30] = 1 << 6
    write_muse_image(tmp / "MASTER_FLAT.fits", "MASTER_FLAT", flat, fdq,
                     np.full(shape, 1e-4), {"ESO QC FLAT MASTER INTFLUX": 123456.7}, "")
    dark = rng.normal(2.0, 0.5, shape)
    ddq = np.zeros(shape, np.int32)
    ddq[200, 20] = 1 << 8
    write_muse_image(tmp / "MASTER_DARK.fits", "MASTER_DARK", dark, ddq, np.full(shape, 0.3),
                     {"EXPTIME": 3600.0}, "count")
    cols = [fits.Column("xpos", "J", array=np.array([PRE + 3, PRE + 50, PRE + NX + 5, 3000, PRE + 100])),
            fits.Column("ypos", "J", array=np.array([PRE + 4, PRE + 90, 20, 5, PRE + NY + 2 * OVS + 7])),
            fits.Column("status", "J", array=np.array([1 << 8, 1 << 9, 1 << 14, 1 << 8, 1 << 29])),
            fits.Column("value", "E", array=np.zeros(5, np.float32))]
    bp = fits.BinTableHDU.from_columns(cols, name="CHAN01")
    fits.HDUList([fits.PrimaryHDU(header=_hdr({"ESO PRO CATG": "BADPIX_TABLE"})), bp]).writeto(
        tmp / "BADPIX_TABLE.fits", overwrite=True)


# ---------------------------------------------------------------------------
# readers and the chain for one exposure


def read_raw(path: Path, ifu: int = 1) -> RawImage:
    return read_raw_ifu(path, ifu)


def read_image(path: Path, ifu: int = 1) -> MuseImage:
    return read_muse_image(path, ifu)


def read_badpix(path: Path, ifu: int = 1):
    return read_badpix_table(path, ifu)


def process_one(raw, bias, settings, flat=None, dark=None, badpix=None, is_illum=False) -> MuseImage:
    """The basic processing of one exposure."""
    calibrations = Calibrations(bias, flat, dark, [badpix] if badpix is not None else [])
    return basicproc.process_exposures([raw], settings, calibrations, illum=[is_illum]).images[0]


def rel_diff(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> float:
    """max |ours - ESO| / max(|ESO|, 1) over mask (1 count floor for values near zero)."""
    a = ours[mask].astype(np.float64)
    b = theirs[mask].astype(np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0))) if a.size else 0.0


# ---------------------------------------------------------------------------
# unit tests (no ESO)


def test_layout_windows_match_the_format_spec():
    header = _hdr(_det_header())
    layout = layout_from_header(header)
    assert layout.raw_shape == (RAW_H, RAW_W)
    (hy, hx), (vy, vx) = overscan_windows(layout, 1, 3)
    assert (hx.start, hx.stop) == (PRE, PRE + NX)
    assert (hy.start, hy.stop) == (PRE + NY + 3, PRE + NY + OVS)
    assert (vx.start, vx.stop) == (PRE + NX + 3, PRE + NX + OVS)
    assert (vy.start, vy.stop) == (PRE, PRE + NY + OVS)
    (hy, hx), (vy, vx) = overscan_windows(layout, 3, 3)
    assert (hx.start, hx.stop) == (PRE + NX + 2 * OVS, PRE + 2 * NX + 2 * OVS)
    assert (vx.start, vx.stop) == (PRE + NX + OVS, PRE + NX + 2 * OVS - 3)
    assert (hy.start, hy.stop) == (PRE + NY + OVS, PRE + NY + 2 * OVS - 3)
    raw = np.arange(RAW_H * RAW_W, dtype=np.float32).reshape(RAW_H, RAW_W)
    trimmed = trim(raw, layout)
    assert trimmed.shape == (2 * NY, 2 * NX)
    assert trimmed[0, 0] == raw[PRE, PRE]
    assert trimmed[-1, -1] == raw[RAW_H - PRE - 1, RAW_W - PRE - 1]
    assert trimmed[NY, NX] == raw[PRE + NY + 2 * OVS, PRE + NX + 2 * OVS]


def test_vpoly_recovers_a_known_overscan_polynomial():
    rng = np.random.default_rng(1)
    layout = layout_from_header(_hdr(_det_header()))
    rows = np.arange(1, RAW_H + 1, dtype=np.float64)
    truth = 1000.0 + 0.05 * rows - 2.0e-4 * rows ** 2
    data = (truth[:, None] + rng.normal(0, 0.5, (RAW_H, RAW_W))).astype(np.float32)
    dq = np.zeros(data.shape, np.uint32)
    coeffs = vpoly_correct(data, dq, layout, OverscanSpec.parse("vpoly"), 3, 30.0)
    for c in coeffs[:1]:
        assert len(c) >= 3
        fitted = slice(PRE, RAW_H // 2)  # quadrant 1's vertical overscan rows
        model = horner_long_double(c, rows[fitted])
        assert np.max(np.abs(model - truth[fitted])) < 0.3
    inner = data[PRE:RAW_H - PRE]
    assert abs(float(np.mean(inner))) < 0.05
    assert float(np.std(inner)) < 0.6


def test_iterate_polyfit_rejects_outliers_like_a_hand_loop():
    rng = np.random.default_rng(2)
    x = np.arange(200.0)
    y = 3.0 + 0.1 * x + rng.normal(0, 1, 200)
    y[[10, 50, 150]] += [40, -35, 60]
    fit = iterate_polyfit(x, y, 1, 3.0)
    keep = np.ones(200, bool)
    while True:
        c = np.polyfit(x[keep], y[keep], 1)[::-1]
        res = y[keep] - (c[0] + c[1] * x[keep])
        rms = math.sqrt(np.mean(res ** 2))
        bad = np.abs(res) >= 3.0 * rms
        if not bad.any():
            break
        keep[np.flatnonzero(keep)[bad]] = False
    assert np.array_equal(fit.keep, keep)
    assert not fit.keep[[10, 50, 150]].any()
    np.testing.assert_allclose(fit.coeffs, c, rtol=1e-9, atol=1e-9)
    assert fit.mse == pytest.approx(rms ** 2, rel=1e-9)


def test_dcr_flags_isolated_hits_only():
    rng = np.random.default_rng(3)
    data = rng.normal(1000, 3, (128, 32)).astype(np.float32)
    hits = [(5, 7), (70, 20), (120, 3)]
    for y, x in hits:
        data[y, x] += 500
    dq = np.zeros(data.shape, np.uint32)
    n = dcr_flag(data, dq, 32, 128, 3, 2.5)
    flagged = set(zip(*np.nonzero(dq)))
    assert flagged == set(hits)
    assert n == 3
    assert all(dq[y, x] == 32 for y, x in hits)


def test_saturation_and_badpix_flags():
    data = np.full((10, 10), 1000, np.float32)
    data[1, 1], data[2, 2], data[3, 3] = 65501, 0, 65500
    dq = np.zeros(data.shape, np.uint32)
    assert basicproc.flag_saturated(data, dq) == 2
    assert dq[1, 1] == dq[2, 2] == 1 << 12 and dq[3, 3] == 0
    table = {"xpos": np.array([2, 11]), "ypos": np.array([2, 1]), "status": np.array([256, 8])}
    assert basicproc.apply_badpix(dq, [table]) == 1
    assert dq[1, 1] == (1 << 12) | 256


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("basicproc")
    rng = np.random.default_rng(42)
    raws = []
    for k, exptime in enumerate((10.0, 12.0, 15.0)):
        path = tmp / f"raw{k + 1}.fits"
        write_raw(path, make_raw(rng, exptime), exptime, dateobs=f"2026-01-01T18:0{k}:00.000")
        raws.append(path)
    cal_vpoly = tmp / "vpoly"
    cal_level = tmp / "level"
    cal_vpoly.mkdir()
    cal_level.mkdir()
    make_calibrations(cal_vpoly, np.random.default_rng(7), bias_level=False)
    make_calibrations(cal_level, np.random.default_rng(7), bias_level=True)
    return dict(tmp=tmp, raws=raws, cal={"vpoly": cal_vpoly, "offset": cal_level, "none": cal_level})


def test_process_exposure_variance_and_dq_rules(synthetic):
    cal = synthetic["cal"]["offset"]
    settings = make_settings({"overscan": "offset", "ovscreject": "none"})
    raw = read_raw(synthetic["raws"][0])
    bias = read_image(cal / "MASTER_BIAS.fits")
    flat = read_image(cal / "MASTER_FLAT.fits")
    plain = process_one(raw, bias, settings)
    flat_fielded = process_one(raw, bias, settings, flat=flat)
    assert plain.data.dtype == np.float32 and plain.stat.dtype == np.float32
    assert plain.header["BUNIT"] == "count"
    good = flat.data != 0
    f = flat.data[good]
    np.testing.assert_allclose(flat_fielded.data[good], plain.data[good] / f, rtol=2e-6)
    expect = (plain.stat[good] + plain.data[good] ** 2 * flat.stat[good] / f ** 2) / f ** 2
    np.testing.assert_allclose(flat_fielded.stat[good], expect, rtol=1e-5)
    assert np.array_equal(flat_fielded.data[~good], plain.data[~good])
    assert np.all(flat_fielded.dq == (plain.dq | flat.dq))
    assert np.all(plain.dq[:, 77] & (1 << 14))
    assert plain.dq[PRE + 5 - PRE, 7] & (1 << 12)
    assert plain.header[basicproc.NSAT_KEY] >= 3


# ---------------------------------------------------------------------------
# parity with ESO (muse_dark runs the muse_basicproc chain and combines)

needs_eso = pytest.mark.skipif(eso.esorex_path() is None, reason="ESO pipeline (esorex) not installed")
DARK_ONLY_BITS = np.uint32((1 << 8) | (1 << 13))  # muse_dark's hot/dark flags on its master


def eso_basicproc(synthetic, tag: str, raws: list[Path], overscan: str, params: dict,
                  dark=True, badpix=True, flat=True) -> tuple[MuseImage, object]:
    """Run muse_dark on ``raws`` with the calibrations for ``overscan``; return its image."""
    cal = synthetic["cal"][overscan.split(":")[0]]
    out = synthetic["tmp"] / f"eso_{tag}"
    lines = [f"{p} DARK" for p in raws] + [f"{cal / 'MASTER_BIAS.fits'} MASTER_BIAS"]
    if flat:
        lines.append(f"{cal / 'MASTER_FLAT.fits'} MASTER_FLAT")
    if dark:
        lines.append(f"{cal / 'MASTER_DARK.fits'} MASTER_DARK")
    if badpix:
        lines.append(f"{cal / 'BADPIX_TABLE.fits'} BADPIX_TABLE")
    out.mkdir(exist_ok=True)
    sof = out / "input.sof"
    sof.write_text("\n".join(lines) + "\n")
    run = eso.run_esorex("muse_dark", sof, out, {"nifu": 1, "hotsigma": 0, "normalize": -1,
                                                 "overscan": overscan, "scale": False, **params})
    assert run.returncode == 0, run.errors
    return read_image(run.product("MASTER_DARK-01.fits")), run


def ours_processed(synthetic, raw: Path, overscan: str, settings, dark=True, badpix=True, flat=True):
    cal = synthetic["cal"][overscan.split(":")[0]]
    return process_one(
        read_raw(raw), read_image(cal / "MASTER_BIAS.fits"), settings,
        flat=read_image(cal / "MASTER_FLAT.fits") if flat else None,
        dark=read_image(cal / "MASTER_DARK.fits") if dark else None,
        badpix=read_badpix(cal / "BADPIX_TABLE.fits") if badpix else None)


def assert_same_as_eso(ours: MuseImage, theirs: MuseImage, label: str) -> dict:
    """Good pixels bit-identical, identical DQ (muse_dark's own hot/dark flags aside)."""
    extra = theirs.dq & ~ours.dq
    assert np.all((extra & ~DARK_ONLY_BITS) == 0), f"{label}: DQ bits ESO has and we lack"
    assert np.all(ours.dq[extra != 0] != 0), f"{label}: muse_dark flagged a pixel we call good"
    assert np.array_equal(ours.dq, theirs.dq & ~np.where(extra != 0, extra, 0).astype(np.uint32))
    good = theirs.dq == 0
    numbers = dict(data=rel_diff(ours.data, theirs.data, good), stat=rel_diff(ours.stat, theirs.stat, good),
                   ngood=int(good.sum()))
    print(f"{label}: max rel diff data {numbers['data']:.3g} stat {numbers['stat']:.3g} "
          f"({numbers['ngood']} good pixels)")
    assert numbers["data"] == 0 and numbers["stat"] == 0, (label, numbers)
    return numbers


@needs_eso
@pytest.mark.eso
@pytest.mark.parametrize("overscan", ["vpoly", "offset", "none"])
@pytest.mark.parametrize("ovscreject", ["dcr", "fit", "none"])
def test_processed_exposure_equals_eso(synthetic, overscan, ovscreject):
    raw = synthetic["raws"][1]
    params = {"ovscreject": ovscreject, "combine": "median"}
    theirs, run = eso_basicproc(synthetic, f"one_{overscan}_{ovscreject}", [raw] * 3, overscan, params)
    settings = make_settings({"overscan": overscan, "ovscreject": ovscreject})
    ours = ours_processed(synthetic, raw, overscan, settings)
    assert_same_as_eso(ours, theirs, f"overscan={overscan} ovscreject={ovscreject}")
    for q in range(1, 5):
        for key in (basicproc.OVSC_MEAN.format(q), basicproc.OVSC_STDEV.format(q)):
            assert np.float32(ours.header[key]) == pytest.approx(theirs.header[key], rel=1e-6)
        if overscan == "vpoly":
            pnc = basicproc.OVSC_PNC.format(q)
            assert ours.header[pnc] == theirs.header[pnc]
            for k in range(ours.header[pnc]):
                assert ours.header[basicproc.OVSC_PY.format(q, k)] == pytest.approx(
                    theirs.header[basicproc.OVSC_PY.format(q, k)], rel=1e-5, abs=1e-12)
    assert ours.header[basicproc.FLAT_FLUX_LAMP] == theirs.header[basicproc.FLAT_FLUX_LAMP]


@needs_eso
@pytest.mark.eso
@pytest.mark.parametrize("dark,badpix,flat", [(False, False, True), (True, False, False), (False, True, False)])
def test_processed_exposure_equals_eso_optional_calibrations(synthetic, dark, badpix, flat):
    raw = synthetic["raws"][2]
    theirs, _ = eso_basicproc(synthetic, f"opt_{dark}_{badpix}_{flat}", [raw] * 3, "vpoly",
                              {"combine": "median"}, dark=dark, badpix=badpix, flat=flat)
    ours = ours_processed(synthetic, raw, "vpoly", make_settings({}), dark=dark, badpix=badpix, flat=flat)
    assert_same_as_eso(ours, theirs, f"dark={dark} badpix={badpix} flat={flat}")


@needs_eso
@pytest.mark.eso
def test_vpoly_level_check_fails_like_eso(synthetic, tmp_path):
    """A MASTER_BIAS whose overscan level is far off stops vpoly processing (ESO: error)."""
    bias = read_image(synthetic["cal"]["vpoly"] / "MASTER_BIAS.fits")
    bias.header[basicproc.OVSC_MEAN.format(2)] = 0.0
    with pytest.raises(OverscanError, match="quadrant 2"):
        process_one(read_raw(synthetic["raws"][0]), bias, make_settings({}))
    path = tmp_path / "MASTER_BIAS.fits"
    with fits.open(synthetic["cal"]["vpoly"] / "MASTER_BIAS.fits") as hdul:
        hdul[0].header["HIERARCH ESO DRS MUSE OVSC2 MEAN"] = 0.0
        hdul.writeto(path)
    sof = tmp_path / "in.sof"
    sof.write_text("".join(f"{p} DARK\n" for p in synthetic["raws"]) + f"{path} MASTER_BIAS\n")
    run = eso.run_esorex("muse_dark", sof, tmp_path / "out", {"nifu": 1})
    assert any("Very different overscan levels" in e for e in run.errors)
    assert not (tmp_path / "out" / "MASTER_DARK-01.fits").exists()


def test_process_exposures_loads_each_calibration_once(synthetic):
    cal = synthetic["cal"]["vpoly"]
    calls = []

    def loader(name):
        def load():
            calls.append(name)
            return read_image(cal / f"{name}.fits")
        return load

    settings = make_settings({})
    raws = [read_raw(p) for p in synthetic["raws"]]
    listwise = basicproc.process_exposures(raws, settings, Calibrations(loader("MASTER_BIAS"), loader("MASTER_FLAT"),
                                                                        loader("MASTER_DARK")),
                                           illum=[False, False, True]).images
    assert calls == ["MASTER_BIAS", "MASTER_DARK", "MASTER_FLAT"]
    single = process_one(raws[2], read_image(cal / "MASTER_BIAS.fits"), settings,
                                        flat=read_image(cal / "MASTER_FLAT.fits"),
                                        dark=read_image(cal / "MASTER_DARK.fits"), is_illum=True)
    assert np.array_equal(listwise[2].data, single.data) and np.array_equal(listwise[2].dq, single.dq)
    assert np.array_equal(listwise[2].stat, single.stat)
    assert listwise[0].header["EXPTIME"] == 10.0 and listwise[2].header["EXPTIME"] == 15.0


def test_flat_mode_mismatch_is_an_error_except_for_illum(synthetic):
    cal = synthetic["cal"]["vpoly"]
    flat = read_image(cal / "MASTER_FLAT.fits")
    flat.header["HIERARCH ESO INS MODE"] = "NFM-AO-N"
    raw, bias = read_raw(synthetic["raws"][0]), read_image(cal / "MASTER_BIAS.fits")
    with pytest.raises(InputError, match="instrument modes"):
        process_one(raw, bias, make_settings({}), flat=flat)
    illum = process_one(raw, bias, make_settings({}), flat=flat, is_illum=True)
    assert illum.header[basicproc.FLAT_FLUX_LAMP] == 123456.7


@needs_eso
@pytest.mark.eso
@pytest.mark.parametrize("overscan,ovscreject,extra", [
    ("vpoly:5,1.01,1.01", "dcr:64,16,2,3.0", {"ovscignore": 5, "ovscsigma": 10.0}),
    ("offset", "fit:3.0", {"ovscignore": 1}),
    ("vpoly", "dcr:200,32,3,2.5", {}),  # box larger than the quadrant: ESO warns and rejects nothing
])
def test_processed_exposure_equals_eso_with_option_strings(synthetic, overscan, ovscreject, extra):
    raw = synthetic["raws"][0]
    params = {"ovscreject": ovscreject, "combine": "median", **extra}
    tag = "opts_" + "_".join(str(v) for v in (overscan, ovscreject, *extra.values())).replace(":", "-")
    theirs, run = eso_basicproc(synthetic, tag, [raw] * 3, overscan, params)
    settings = make_settings({"overscan": overscan, "ovscreject": ovscreject, **extra})
    ours = ours_processed(synthetic, raw, overscan, settings)
    assert_same_as_eso(ours, theirs, f"overscan={overscan} ovscreject={ovscreject} {extra}")
    for q in range(1, 5):
        key = basicproc.OVSC_STDEV.format(q)
        assert np.float32(ours.header[key]) == pytest.approx(theirs.header[key], rel=1e-6)
    if ovscreject.startswith("dcr:200"):
        assert any("illegal DCR parameters" in w for w in run.warnings)
