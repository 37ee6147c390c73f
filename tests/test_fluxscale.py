"""ILLUM slice correction, wavelength cut, per-IFU flux scaling, and resampling IFU by IFU."""

from dataclasses import dataclass, fields, replace

import numpy as np
import pytest
from astropy.io import fits

from musetwilight.core import fluxscale, illum
from musetwilight.core.cplmath import median_of
from musetwilight.errors import MergeError, ParameterError


@dataclass
class Table:
    xpos: np.ndarray
    ypos: np.ndarray
    lambda_: np.ndarray
    data: np.ndarray
    stat: np.ndarray
    dq: np.ndarray
    origin: np.ndarray
    header: fits.Header


def make_table(rng, n, slices=(1, 2, 3), level=100.0, lam=(4800.0, 9300.0), ifu=1):
    slice_of_row = np.sort(rng.choice(slices, n)).astype(np.uint32)
    return Table(
        xpos=rng.uniform(0, 10, n).astype(np.float32), ypos=rng.uniform(0, 10, n).astype(np.float32),
        lambda_=rng.uniform(*lam, n).astype(np.float32),
        data=(level * rng.uniform(0.9, 1.1, n)).astype(np.float32),
        stat=np.full(n, level, np.float32), dq=np.zeros(n, np.uint32),
        origin=slice_of_row | np.uint32(ifu << 6), header=fits.Header())


def scaled_tables(tables, nfm, scales=None):
    """Flux scales and each table divided by its divisor (data / d, stat / d**2 in double, as CPL)."""
    info = fluxscale.flux_scales(tables, nfm, scales)
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for ifu, d in info.divisor.items():
            t = tables[ifu]
            out[ifu] = replace(t, data=(t.data / np.float64(d)).astype(np.float32),
                               stat=(t.stat / np.float64(d * d)).astype(np.float32))
    return out, info


def concatenate(tables):
    names = [f.name for f in fields(tables[0]) if isinstance(getattr(tables[0], f.name), np.ndarray)]
    return replace(tables[0], **{n: np.concatenate([getattr(t, n) for t in tables]) for n in names})


def test_restrict_wavelength_is_inclusive_in_float32():
    rng = np.random.default_rng(1)
    table = make_table(rng, 1000)
    table.lambda_[:2] = [5000.0, 9000.0]
    cut = illum.restrict_wavelength(table, 5000.0, 9000.0)
    assert cut.lambda_.min() >= 5000.0 and cut.lambda_.max() <= 9000.0
    assert np.count_nonzero((table.lambda_ >= 5000) & (table.lambda_ <= 9000)) == cut.data.size
    assert cut.origin.size == cut.data.size == cut.xpos.size


def test_illum_correction_recovers_slice_efficiencies():
    rng = np.random.default_rng(2)
    lamp = make_table(rng, 6000, slices=(1, 2, 3, 4))
    efficiency = np.array([0, 1.0, 0.8, 1.25, 0.5])
    lamp.data = (lamp.data * efficiency[lamp.origin & 0x3F]).astype(np.float32)
    correction = illum.illum_correction(lamp)
    assert list(correction.slices) == [1, 2, 3, 4]
    assert correction.factors.mean() == pytest.approx(1.0)
    expected = 1 / efficiency[1:] / np.mean(1 / efficiency[1:])
    np.testing.assert_allclose(correction.factors, expected, rtol=0.02)
    sky = make_table(rng, 3000, slices=(1, 2, 3, 4), level=50.0)
    corrected = illum.apply_illum(sky, correction, ifu=1)
    rows = (sky.origin & 0x3F) == 3
    np.testing.assert_allclose(corrected.data[rows], sky.data[rows] * correction.factors[2], rtol=1e-6)
    np.testing.assert_allclose(corrected.stat[rows], sky.stat[rows] * correction.factors[2] ** 2, rtol=1e-6)
    assert corrected.header["ESO DRS MUSE PIXTABLE ILLUM3"] == pytest.approx(correction.factors[2])
    assert corrected.header["ESO DRS MUSE PIXTABLE ILLUM MEAN"] == pytest.approx(1.0)


def _tables(rng, levels):
    return {ifu: make_table(rng, 500, level=level, ifu=ifu) for ifu, level in levels.items()}


def test_flux_scaling_relative_to_ifu1():
    rng = np.random.default_rng(3)
    tables = _tables(rng, {1: 100.0, 2: 50.0, 3: 200.0})
    raw_flux = {n: float(np.sum(t.data, dtype=np.float64)) for n, t in tables.items()}
    scaled, info = scaled_tables(tables, nfm=False)
    assert info.reference_ifu == 1
    for ifu in (1, 2, 3):
        assert info.flux[ifu] == pytest.approx(raw_flux[ifu], rel=1e-12)
        assert info.scale[ifu] == pytest.approx(raw_flux[ifu] / raw_flux[1], rel=1e-12)
        np.testing.assert_allclose(scaled[ifu].data, tables[ifu].data / info.scale[ifu], rtol=1e-6)
        np.testing.assert_allclose(scaled[ifu].stat, tables[ifu].stat / info.scale[ifu] ** 2, rtol=1e-6)


def test_nfm_ifu24_takes_ifu23_flux_and_without_23_becomes_nonfinite():
    rng = np.random.default_rng(4)
    tables = _tables(rng, {1: 100.0, 23: 80.0, 24: 10.0})
    _, info = scaled_tables(tables, nfm=True)
    assert info.flux[24] == info.flux[23]
    scaled, info = scaled_tables(_tables(rng, {1: 100.0, 24: 10.0}), nfm=True)
    assert info.flux[24] == 0.0 and not np.isfinite(scaled[24].data).any()


def test_external_scales():
    rng = np.random.default_rng(5)
    tables = _tables(rng, {1: 100.0, 2: 50.0})
    scales = [2.0, 0.5] + [1.0] * 22
    scaled, info = scaled_tables(tables, nfm=False, scales=scales)
    np.testing.assert_allclose(scaled[1].data, tables[1].data / 2.0, rtol=1e-6)
    np.testing.assert_allclose(scaled[2].data, tables[2].data / 0.5, rtol=1e-6)
    assert info.flux[2] == pytest.approx(0.5 * info.flux[1])
    # a list of the wrong length is ignored, after IFU 1 was divided by its first value (ESO)
    scaled, info = scaled_tables(tables, nfm=False, scales=[4.0, 1.0])
    np.testing.assert_allclose(scaled[1].data, tables[1].data / 4.0, rtol=1e-6)
    assert info.scale[2] == pytest.approx(info.flux[2] / info.flux[1])
    assert fluxscale.parse_scales(" 1, 2.5 ,3") == [1.0, 2.5, 3.0]
    with pytest.raises(ParameterError, match="cannot parse"):
        fluxscale.parse_scales("1,x")


def test_missing_ifu1_uses_first_present_ifu():
    rng = np.random.default_rng(6)
    _, info = scaled_tables(_tables(rng, {2: 100.0, 3: 50.0}), nfm=False)
    assert info.reference_ifu == 2 and info.scale[2] == 1.0


def test_no_pixels_left_is_a_clear_error():
    rng = np.random.default_rng(7)
    empty = illum.restrict_wavelength(make_table(rng, 10, lam=(4000, 4500)), 5000, 9000)
    with pytest.raises(MergeError, match="no pixels for cube reconstruction"):
        scaled_tables({1: empty}, nfm=False)


def test_resampling_ifu_tables_equals_resampling_the_merged_table():
    """The streaming path (no merged table) gives bit-identical cubes to the merge-then-resample path."""
    from musetwilight.core.cube import make_grid
    from musetwilight.core.resample import ResampleOptions, TableSource, resample_cube, resample_tables
    from musetwilight.params import CrType, Resample

    rng = np.random.default_rng(9)
    tables = {ifu: make_table(rng, 6000, level=level, ifu=ifu, lam=(5000.0, 7000.0))
              for ifu, level in ((1, 100.0), (2, 70.0), (3, 130.0))}
    for table in tables.values():
        table.dq[rng.random(table.dq.size) < 0.02] = 1 << 6
        table.data[rng.random(table.data.size) < 0.01] *= 50  # cosmic rays
    scaled, info = scaled_tables(tables, nfm=False)
    merged = concatenate([scaled[i] for i in (1, 2, 3)])
    grid = make_grid(merged.xpos, merged.ypos, merged.lambda_, 250.0)
    for method, crtype in (("drizzle", "median"), ("nearest", "iraf"), ("renka", "mean")):
        options = ResampleOptions(Resample(method), CrType(crtype), 3.0)
        reference = resample_cube(merged.xpos, merged.ypos, merged.lambda_, merged.data, merged.stat,
                                  merged.dq, grid, options)
        streamed = resample_tables([tables[i] for i in (1, 2, 3)], [info.divisor[i] for i in (1, 2, 3)], grid,
                                   options)
        np.testing.assert_array_equal(streamed.data, reference.data)
        np.testing.assert_array_equal(streamed.stat, reference.stat)
        np.testing.assert_array_equal(streamed.pixel_dq, reference.pixel_dq)
        assert streamed.ncosmic == reference.ncosmic > 0
        total = sum(t.xpos.size for t in tables.values())
        for tiles in (2, 3, grid.ny):  # tiles of cube rows, tables loaded by functions, with and without prefetch
            sources = [TableSource(tables[i].xpos.size, (float(tables[i].ypos.min()), float(tables[i].ypos.max())),
                                   lambda t=tables[i]: t) for i in (1, 2, 3)]
            tiled = resample_tables(sources, [info.divisor[i] for i in (1, 2, 3)], grid, options,
                                    rows_per_tile=total // tiles, prefetch=tiles != 3)
            np.testing.assert_array_equal(tiled.data, reference.data)
            np.testing.assert_array_equal(tiled.stat, reference.stat)
            np.testing.assert_array_equal(tiled.dq, reference.dq)
            assert tiled.ncosmic == reference.ncosmic


def test_cpl_median_even_and_odd_in_the_data_precision():
    assert median_of(np.array([3, 1, 2], np.float32)) == 2.0
    assert median_of(np.array([4, 1, 3, 2], np.float32)) == 2.5
    assert np.isnan(median_of(np.array([], np.float32)))
    # float32 arithmetic of the middle pair: a + (b - a) / 2 rounded in single precision
    a, b = np.float32(1.0), np.float32(1.0000001)
    assert median_of(np.array([a, b], np.float32)) == float(np.float32(a + (b - a) / np.float32(2)))
