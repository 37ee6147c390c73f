"""Property and fuzz tests (hypothesis): combination against reference formulas, polynomial
fits recovering known polynomials, resampling of a constant field, and the FITS readers
given random corruptions of valid files."""

from __future__ import annotations

import io as pyio
import math

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from musetwilight.core import combine, smooth
from musetwilight.core.images import MuseImage
from musetwilight.core.overscan import FLT_MAX, iterate_polyfit
from musetwilight.core.resample import ResampleOptions, resample_cube
from musetwilight.errors import InputError
from musetwilight.io import formats as io
from musetwilight.params import CrType, Resample, make_settings

# derandomized: CI explores the same examples on every run (no flaky failures)
FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- combination

FLAGS = [0, 0, 0, 0, 1 << 5, 1 << 12, 1 << 14, 1 << 30, 1 << 31, (1 << 31) | 1]


@st.composite
def stacks(draw, min_n=1, max_n=7):
    """n exposures of a small image: finite float32 data and positive variances where good,
    DQ drawn from Euro3D bits, NaN in some flagged pixels (as after basic processing)."""
    n = draw(st.integers(min_n, max_n))
    shape = (n, draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    values = st.floats(-1e4, 1e4, width=32, allow_nan=False)
    data = draw(arrays(np.float32, shape, elements=values))
    stat = draw(arrays(np.float32, shape, elements=st.floats(2.0 ** -10, 1e4, width=32)))
    dq = draw(arrays(np.uint32, shape, elements=st.sampled_from(FLAGS)))
    nan = draw(arrays(np.bool_, shape)) & (dq != 0)
    data[nan] = np.nan
    return data, dq, stat


def _images(data, dq, stat):
    return [MuseImage(data[k].copy(), dq[k].copy(), stat[k].copy(), fits.Header()) for k in range(len(data))]


def _fallback(d, q, s):
    """Least-bad input where none is good: smallest DQ below 1<<31, first on ties (ESO)."""
    best, outdq = 0, 1 << 31
    for k in range(len(q)):
        if q[k] < outdq:
            best, outdq = k, int(q[k])
    return d[best], outdq, s[best]


def _desc(values, variances):
    """Pairs sorted by decreasing value, ties by decreasing variance."""
    order = sorted(range(len(values)), key=lambda k: (-values[k], -variances[k]))
    return [values[k] for k in order], [variances[k] for k in order]


def reference(method, d, q, s, p):
    """(data, dq, stat) of one pixel from its stack, written straight from the definitions."""
    d = [float(v) for v in d]
    s = [float(v) for v in s]
    good = [k for k in range(len(d)) if q[k] == 0]
    if not good:
        return _fallback(d, q, s)
    v = [d[k] for k in good]
    w = [s[k] for k in good]
    n = len(v)
    if method == "average":
        return sum(v) / n, 0, sum(w) / n / n
    if method == "median":
        v, w = _desc(v, w)
        m = n // 2
        if n % 2:
            return v[m], 0, w[m]
        return 0.5 * (v[m] + v[m - 1]), 0, w[m] + w[m - 1]
    if method == "sigclip":
        ordered = sorted(v)
        med = ordered[(n - 1) // 2] if n % 2 else ordered[n // 2 - 1] + (ordered[n // 2] - ordered[n // 2 - 1]) / 2
        mdev = sum(abs(x - med) for x in v) / n
        lo, hi = med - p.lsigma * mdev, med + p.hsigma * mdev
        kept = [k for k in range(n) if not hi > lo or lo <= v[k] <= hi]
        return sum(v[k] for k in kept) / len(kept), 0, sum(w[k] for k in kept) / len(kept) ** 2
    # minmax: drop nlow lowest and nhigh highest; pad with bad inputs (in order) up to nkeep
    npix = n - p.nhigh - p.nlow
    outdq = 0
    if 0 < npix < p.nkeep:
        for k in range(len(d)):
            if npix >= p.nkeep:
                break
            if q[k] != 0:
                v.append(d[k])
                w.append(s[k])
                outdq |= int(q[k])
                npix += 1
    v, w = _desc(v, w)
    if npix == 0:
        return math.nan, outdq, math.nan
    kept = range(p.nhigh, p.nhigh + max(npix, 0))
    return sum(v[k] for k in kept) / npix, outdq, sum(w[k] for k in kept) / npix / npix


@FAST
@given(stack=stacks(), method=st.sampled_from(["average", "median", "sigclip", "minmax"]),
       nlow=st.integers(0, 2), nhigh=st.integers(0, 2), nkeep=st.integers(1, 3),
       lsigma=st.floats(0.5, 4), hsigma=st.floats(0.5, 4))
def test_combination_follows_the_reference_formulas(stack, method, nlow, nhigh, nkeep, lsigma, hsigma):
    data, dq, stat = stack
    n = len(data)
    p = make_settings({"combine": method, "nlow": nlow, "nhigh": nhigh, "nkeep": nkeep,
                       "lsigma": lsigma, "hsigma": hsigma})
    if n == 1:  # a single exposure is copied, whatever the method (as ESO's muse_combine_images)
        out = combine.combine_exposures(_images(data, dq, stat), p)
        np.testing.assert_array_equal(out.data, data[0])
        np.testing.assert_array_equal(out.dq, dq[0])
        return
    if method == "sigclip" and n < 3 or method == "minmax" and (n - nhigh - nlow < nkeep or n - nhigh <= 0):
        with pytest.raises(InputError):
            combine.combine_exposures(_images(data, dq, stat), p)
        return
    out = combine.combine_exposures(_images(data, dq, stat), p)
    expected = np.empty(data.shape[1:] + (3,), dtype=np.float64)
    for i, j in np.ndindex(data.shape[1:]):
        expected[i, j] = reference(method, data[:, i, j], dq[:, i, j], stat[:, i, j], p)
    np.testing.assert_array_equal(out.data, expected[..., 0].astype(np.float32))
    np.testing.assert_array_equal(out.dq, expected[..., 1].astype(np.uint32))
    np.testing.assert_array_equal(out.stat, expected[..., 2].astype(np.float32))


@FAST
@given(stack=stacks(min_n=1, max_n=1))
def test_interpolation_leaves_good_pixels_and_fills_every_bad_one(stack):
    data, dq, stat = stack
    image = MuseImage(data[0], dq[0], stat[0], fits.Header())
    good = dq[0] == 0
    if not good.any():
        with pytest.raises(InputError, match="no unflagged pixel"):
            combine.interpolate_bad_pixels(image)
        return
    out = combine.interpolate_bad_pixels(image)
    np.testing.assert_array_equal(out.data[good], data[0][good])
    np.testing.assert_array_equal(out.dq, dq[0])
    assert np.isfinite(out.data).all()
    assert out.data.min() >= data[0][good].min() and out.data.max() <= data[0][good].max()


# --------------------------------------------------------------------------- polynomial fits

@FAST
@given(coeffs=st.lists(st.floats(-5, 5), min_size=1, max_size=4), start=st.integers(1, 3000),
       n=st.integers(40, 400))
def test_overscan_polynomial_fit_recovers_a_known_polynomial(coeffs, start, n):
    x = np.arange(start, start + n, dtype=np.float64)
    t = (x - x.mean()) / n  # a polynomial of modest dynamic range over the rows
    y = 1000.0 + np.polynomial.polynomial.polyval(t, coeffs)
    for sigma in (FLT_MAX, 3.0):  # 3 sigma may reject points off by rounding only
        fit = iterate_polyfit(x, y, len(coeffs) - 1, sigma)
        model = np.polynomial.polynomial.polyval(x, fit.coeffs)
        np.testing.assert_allclose(model, y, rtol=0, atol=1e-6)
        assert fit.keep.sum() > len(coeffs)


@FAST
@given(xorder=st.integers(0, 3), yorder=st.integers(0, 3), seed=st.integers(0, 2**32 - 1),
       ny=st.integers(8, 20), nx=st.integers(8, 20))
def test_image_polynomial_fit_recovers_a_known_polynomial(xorder, yorder, seed, ny, nx):
    rng = np.random.default_rng(seed)
    coeffs = rng.uniform(-1, 1, (yorder + 1, xorder + 1))
    y, x = np.mgrid[1:ny + 1, 1:nx + 1].astype(np.float64)
    truth = 10.0 + np.polynomial.polynomial.polyval2d((y - ny / 2) / ny, (x - nx / 2) / nx, coeffs)
    bad = rng.random((ny, nx)) < 0.2
    image = np.where(bad, np.float32(1e6), truth).astype(np.float32)  # bad pixels must not count
    fit = smooth.fit_polynomial_image(image, bad, xorder, yorder)
    np.testing.assert_allclose(fit, truth, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------- resampling

@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), value=st.floats(-1e4, 1e4).filter(lambda v: abs(v) > 1e-3),
       method=st.sampled_from(list(Resample)))
def test_resampling_keeps_a_constant_field_constant(seed, value, method):
    rng = np.random.default_rng(seed)
    n = 2000
    xpos = rng.uniform(0, 8, n).astype(np.float32)
    ypos = rng.uniform(0, 6, n).astype(np.float32)
    lam = rng.uniform(5000, 6000, n).astype(np.float32)
    data = np.full(n, value, np.float32)
    stat = rng.uniform(0.5, 2, n).astype(np.float32)
    cube = resample_cube(xpos, ypos, lam, data, stat, np.zeros(n, np.uint32),
                         options=ResampleOptions(method, CrType.MEDIAN, 5.0), dlambda=250.0)
    finite = np.isfinite(cube.data)
    assert finite.sum() >= 40  # (of 315 voxels; lanczos leaves most of this small cube's edge empty)
    np.testing.assert_allclose(cube.data[finite], np.float32(value), rtol=1e-5)


# --------------------------------------------------------------------------- corrupted files

def _muse_image_file() -> bytes:
    """A merged two-IFU MUSE image (as MASTER_FLAT)."""
    primary = fits.PrimaryHDU()
    primary.header["PIPEFILE"] = "MASTER_FLAT.fits"
    primary.header["HIERARCH ESO PRO CATG"] = "MASTER_FLAT"
    hdus = [primary]
    for ifu in (1, 2):
        rng = np.random.default_rng(ifu)
        data = fits.ImageHDU(rng.normal(1, 0.1, (6, 8)).astype(np.float32), name=f"CHAN{ifu:02d}.DATA")
        data.header["BUNIT"] = "1"
        hdus += [data, fits.ImageHDU(np.zeros((6, 8), np.int32), name=f"CHAN{ifu:02d}.DQ"),
                 fits.ImageHDU(np.full((6, 8), 0.01, np.float32), name=f"CHAN{ifu:02d}.STAT")]
    return _bytes(fits.HDUList(hdus))


def _raw_file() -> bytes:
    """A one-IFU raw exposure with the detector keywords (mini layout: 4 x (8+4+4) pixels)."""
    primary = fits.PrimaryHDU()
    primary.header["HIERARCH ESO DET BINX"] = 1
    primary.header["HIERARCH ESO DET BINY"] = 1
    ext = fits.ImageHDU(np.full((32, 32), 1000, np.int16), name="CHAN01")
    for q, (x, y) in enumerate([(1, 1), (4096, 1), (4096, 4112), (1, 4112)], start=1):
        for key, value in (("X", x), ("Y", y), ("NX", 8), ("NY", 8), ("PRSCX", 4), ("PRSCY", 4),
                           ("OVSCX", 4), ("OVSCY", 4)):
            ext.header[f"HIERARCH ESO DET OUT{q} {key}"] = value
        ext.header[f"HIERARCH ESO DET OUT{q} GAIN"] = 1.1
    ext.header["HIERARCH ESO DET CHIP NAME"] = "SIM01"
    ext.header["HIERARCH ESO DET CHIP ID"] = "ID01"
    return _bytes(fits.HDUList([primary, ext]))


def _table_file() -> bytes:
    """A TRACE-like per-IFU table file and a generic table (as GEOMETRY_TABLE) in one."""
    columns = [fits.Column("SliceNo", "J", array=np.arange(1, 5)), fits.Column("tc0_00", "D", array=np.ones(4))]
    primary = fits.PrimaryHDU()
    primary.header["PIPEFILE"] = "TRACE_TABLE.fits"
    return _bytes(fits.HDUList([primary, fits.BinTableHDU.from_columns(columns, name="CHAN01"),
                                fits.BinTableHDU.from_columns(columns, name="CHAN02")]))


def _geometry_file() -> bytes:
    n = 4
    columns = [fits.Column(name, "J", array=np.arange(n) + 1) for name in ("SubField", "SliceCCD", "SliceSky")]
    columns += [fits.Column(name, "D", array=np.linspace(0, 1, n)) for name in ("x", "y", "angle", "width")]
    return _bytes(fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(columns)]))


def _badpix_file() -> bytes:
    columns = [fits.Column("xpos", "J", array=[1, 2]), fits.Column("ypos", "J", array=[3, 4]),
               fits.Column("status", "J", array=[32, 64]), fits.Column("value", "E", array=[0.0, 1.0])]
    primary = fits.PrimaryHDU()
    return _bytes(fits.HDUList([primary, fits.BinTableHDU.from_columns(columns, name="CHAN01")]))


def _mask_file() -> bytes:
    mask = np.zeros((10, 12), np.uint8)
    mask[:3, :3] = 1
    return _bytes(fits.HDUList([fits.PrimaryHDU(mask)]))


def _bytes(hdul: fits.HDUList) -> bytes:
    buffer = pyio.BytesIO()
    hdul.writeto(buffer)
    return buffer.getvalue()


READERS = {
    "muse_image": (_muse_image_file, lambda p: (io.read_muse_image(p, 2), io.scan_fits(p))),
    "raw": (_raw_file, lambda p: (io.read_raw_ifu(p, 1), io.has_ifu_extension(p, 2))),
    "ifu_table": (_table_file, lambda p: (io.read_ifu_table(p, 2, "TRACE_TABLE"), io.read_header(p, 1))),
    "geometry": (_geometry_file, lambda p: io.read_geometry_table(p)),
    "badpix": (_badpix_file, lambda p: io.read_badpix_table(p, 1)),
    "mask": (_mask_file, lambda p: io.read_vignetting_mask(p)),
}
VALID = {name: make() for name, (make, _) in READERS.items()}


@st.composite
def corruptions(draw, original: bytes):
    """A damaged copy: truncated, bytes overwritten, or a header card's value garbled."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "card", "append"]))
    data = bytearray(original)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if kind == "append":
        return bytes(data) + draw(st.binary(min_size=1, max_size=3000))
    if kind == "overwrite":
        start = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=200))
        data[start:start + len(patch)] = patch
        return bytes(data[:len(original)])
    cards = [k for k in range(0, len(data), 80) if data[k + 8:k + 10] == b"= "]
    k = draw(st.sampled_from(cards))
    value = draw(st.sampled_from([b"-1", b"0", b"999999999", b"'CHAN02.DATA'", b"'DATA'", b"T", b"1.5E400",
                                  b"'unterminated", b"(1, 2)", b"", b"-32", b"64", b"'1PD(3)'", b"NaN"]))
    data[k + 10:k + 80] = value.ljust(70)[:70]
    return bytes(data)


@pytest.mark.parametrize("kind", sorted(READERS))
@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_readers_raise_clear_errors_on_corrupted_files(tmp_path, kind, data):
    damaged = data.draw(corruptions(VALID[kind]))
    path = tmp_path / f"{kind}.fits"
    path.write_bytes(damaged)
    try:
        READERS[kind][1](path)
    except InputError as err:
        assert str(path) in str(err)


def test_valid_fuzz_files_read(tmp_path):
    for kind, (make, read) in READERS.items():
        path = tmp_path / f"{kind}.fits"
        path.write_bytes(make())
        assert read(path) is not None


@pytest.mark.parametrize("kind, key", [("geometry", b"NAXIS   "), ("geometry", b"TFIELDS "), ("mask", b"NAXIS   ")])
def test_absurd_axis_or_column_counts_are_refused_at_once(tmp_path, kind, key):
    """astropy loops over NAXIS/TFIELDS keywords: a corrupt count of 10^9 must not hang the run."""
    data = bytearray(VALID[kind])
    start = [k for k in range(0, len(data), 80) if data[k:k + 8] == key][-1]
    data[start + 10:start + 80] = b"999999999".rjust(20).ljust(70)
    path = tmp_path / "absurd.fits"
    path.write_bytes(bytes(data))
    name = key.decode().strip()
    with pytest.raises(InputError, match=f"corrupt FITS header of HDU [01]: {name} = 999999999 "
                                         r"\(FITS allows 0..999\)"):
        READERS[kind][1](path)
