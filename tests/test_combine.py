"""Exposure combination, bad-pixel interpolation and QC: formulas and parity with ESO."""

from __future__ import annotations

import numpy as np
import pytest
import test_basicproc as tb
from astropy.io import fits
from parity import same_card_value

from musetwilight.core import basicproc, combine
from musetwilight.core.images import MuseImage
from musetwilight.params import make_settings


def _images(data, dq, stat, exptimes=None):
    out = []
    for k in range(len(data)):
        header = fits.Header()
        header["EXPTIME"] = float(exptimes[k]) if exptimes is not None else 10.0
        header[basicproc.NSAT_KEY] = k
        out.append(MuseImage(np.array(data[k], np.float32), np.array(dq[k], np.uint32),
                             np.array(stat[k], np.float32), header))
    return out


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(5)
    n, shape = 5, (40, 30)
    data = rng.normal(100, 10, (n, *shape)).astype(np.float32)
    data[2, 5, 5] += 1000  # an outlier
    stat = rng.uniform(1, 2, (n, *shape)).astype(np.float32)
    dq = np.zeros((n, *shape), np.uint32)
    dq[0, 1, 1] = 4
    dq[1:3, 2, 2] = 8
    dq[:, 3, 3] = [64, 32, 4096, 32, 512]  # all bad: least bad (32) of the first such input
    dq[:4, 4, 4] = 2  # one good pixel left
    return data, dq, stat


def _good_lists(data, dq, stat, i, j):
    good = dq[:, i, j] == 0
    return data[good, i, j].astype(np.float64), stat[good, i, j].astype(np.float64)


def test_average_and_median_follow_the_formulas(stack):
    data, dq, stat = stack
    avg = combine.combine_exposures(_images(data, dq, stat), make_settings({"combine": "average"}))
    med = combine.combine_exposures(_images(data, dq, stat), make_settings({"combine": "median"}))
    for (i, j) in [(0, 0), (1, 1), (2, 2), (4, 4), (5, 5), (20, 17)]:
        d, s = _good_lists(data, dq, stat, i, j)
        assert avg.data[i, j] == np.float32(d.sum() / len(d))
        assert avg.stat[i, j] == np.float32(s.sum() / len(d) / len(d))
        order = np.lexsort((-s, -d))
        d, s = d[order], s[order]
        m = len(d) // 2
        expect = (d[m], s[m]) if len(d) % 2 else (0.5 * (d[m] + d[m - 1]), s[m] + s[m - 1])
        assert (med.data[i, j], med.stat[i, j]) == (np.float32(expect[0]), np.float32(expect[1]))
        assert avg.dq[i, j] == med.dq[i, j] == 0
    for image in (avg, med):
        assert image.dq[3, 3] == 32 and image.data[3, 3] == data[1, 3, 3]
        assert image.stat[3, 3] == stat[1, 3, 3]
    assert basicproc.NSAT_KEY not in avg.header


def test_minmax_keeps_nkeep_with_bad_pixels(stack):
    data, dq, stat = stack
    settings = make_settings({"combine": "minmax", "nlow": 1, "nhigh": 1, "nkeep": 2})
    out = combine.combine_exposures(_images(data, dq, stat), settings)
    d, s = _good_lists(data, dq, stat, 5, 5)
    order = np.argsort(d)
    kept = order[1:-1]
    assert out.data[5, 5] == np.float32(d[kept].sum() / 3)
    assert out.stat[5, 5] == np.float32(s[kept].sum() / 9)
    # (2, 2): 3 good -> 1 left < nkeep=2: the first bad input is added, its DQ ORed in
    vals = list(data[[0, 3, 4], 2, 2]) + [data[1, 2, 2]]
    svals = list(stat[[0, 3, 4], 2, 2]) + [stat[1, 2, 2]]
    order = np.argsort(vals)[::-1]
    kept = order[1:3]
    assert out.dq[2, 2] == 8
    assert out.data[2, 2] == np.float32(np.sum(np.asarray(vals, np.float64)[kept]) / 2)
    assert out.stat[2, 2] == np.float32(np.sum(np.asarray(svals, np.float64)[kept]) / 4)
    with pytest.raises(Exception, match="Not enough images"):
        combine.combine_exposures(_images(data[:2], dq[:2], stat[:2]), settings)


def test_sigclip_rejects_about_the_median_with_mean_absolute_deviation(stack):
    data, dq, stat = stack
    out = combine.combine_exposures(_images(data, dq, stat), make_settings({"combine": "sigclip",
                                                                            "lsigma": 1.5, "hsigma": 1.0}))
    for (i, j) in [(5, 5), (0, 0), (10, 10), (2, 2)]:
        d, s = _good_lists(data, dq, stat, i, j)
        med = np.median(d)
        mdev = np.mean(np.abs(d - med))
        keep = (d >= med - 1.5 * mdev) & (d <= med + 1.0 * mdev)
        assert out.data[i, j] == np.float32(d[keep].sum() / keep.sum())
        assert out.stat[i, j] == np.float32(s[keep].sum() / keep.sum() ** 2)
    assert out.data[5, 5] < 200  # the outlier went
    three = combine.combine_exposures(_images(data[:3], dq[:3], stat[:3]), make_settings({"combine": "sigclip"}))
    assert three.data[5, 5] == np.float32(data[:3, 5, 5].astype(np.float64).sum() / 3)  # 3 values: no rejection


def test_scale_multiplies_by_exposure_time_ratio(stack):
    data, dq, stat = stack
    images = _images(data, dq, stat, exptimes=[10, 20, 5, 10, 40])
    out = combine.combine_exposures(images, make_settings({"combine": "average", "scale": True}))
    f = np.array([1, 0.5, 2, 1, 0.25])
    d = (data[:, 0, 0] * f.astype(np.float32)).astype(np.float64)
    assert out.data[0, 0] == np.float32(d.sum() / 5)
    assert images[1].header["EXPTIME"] == 10.0
    assert images[4].data[0, 0] == data[4, 0, 0] * np.float32(0.25)


def test_interpolation_uses_good_neighbours_and_keeps_dq():
    rng = np.random.default_rng(9)
    data = rng.normal(10, 1, (20, 20)).astype(np.float32)
    stat = rng.uniform(1, 2, (20, 20)).astype(np.float32)
    dq = np.zeros((20, 20), np.uint32)
    dq[5, 5] = 1
    dq[10:13, 10:13] = 2  # a 3x3 block: the centre needs a second pass
    dq[0, 0] = 4
    out = combine.interpolate_bad_pixels(MuseImage(data, dq, stat, fits.Header()))
    assert np.array_equal(out.dq, dq)
    assert out.data[5, 5] == np.float32(np.mean(np.delete(data[4:7, 4:7].ravel(), 4).astype(np.float64)))
    assert out.data[0, 0] == np.float32(np.mean(np.array([data[0, 1], data[1, 0], data[1, 1]], np.float64)))
    # corner (10, 10) of the block: its five good neighbours are the row above and the column left
    edge = data[9:12, 9:12]
    expect = np.mean(np.concatenate([edge[0, 0:3], edge[1:3, 0]]).astype(np.float64))
    assert out.data[10, 10] == np.float32(expect)
    ring = np.delete(out.data[10:13, 10:13].ravel(), 4).astype(np.float64)
    assert out.data[11, 11] == np.float32(ring.mean())
    assert out.stat[5, 5] == np.float32(np.mean(np.delete(stat[4:7, 4:7].ravel(), 4).astype(np.float64)))
    good = dq == 0
    assert np.array_equal(out.data[good], data[good])


def test_qc_statistics_follow_cpl_definitions(stack):
    data, dq, stat = stack
    images = _images(data[:4], dq[:4], stat[:4])
    master = combine.combine_exposures(images, make_settings({"combine": "average"}))
    qc = combine.exposure_qc(images, 7)
    d = data[1].astype(np.float64)
    assert qc["ESO QC TWILIGHT7 INPUT2 MEAN"] == np.float32(d.mean())
    assert qc["ESO QC TWILIGHT7 INPUT2 STDEV"] == np.float32(d.std(ddof=1))
    srt = np.sort(data[1].ravel())
    a, b = srt[599], srt[600]
    assert qc["ESO QC TWILIGHT7 INPUT2 MEDIAN"] == np.float32(a + (b - a) / np.float32(2))
    assert qc["ESO QC TWILIGHT7 INPUT2 MIN"] == data[1].min()
    assert qc["ESO QC TWILIGHT7 INPUT3 NSATURATED"] == 2
    mq = combine.master_qc(master, 7)
    assert mq["ESO QC TWILIGHT7 MASTER INTFLUX"] == np.float32(master.data.astype(np.float64).sum())
    assert mq["ESO QC TWILIGHT7 MASTER MAX"] == master.data.max()
    rejected = np.zeros(data[0].shape, bool)
    rejected[0, :] = True
    qc2 = combine.exposure_qc(images, 7, rejected)
    assert qc2["ESO QC TWILIGHT7 INPUT1 MEAN"] == np.float32(data[0, 1:].astype(np.float64).mean())


# ---------------------------------------------------------------------------
# parity with ESO: muse_dark combines basic-processed exposures the same way


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("combine")
    rng = np.random.default_rng(11)
    raws = []
    for k, exptime in enumerate((10.0, 12.0, 15.0, 10.0, 11.0)):
        raw = tb.make_raw(rng, exptime)
        raw[tb.PRE + 20 + k, tb.PRE + 30] = 0  # saturated ("<= 0") in this exposure only
        raw[tb.PRE + 40, tb.PRE + 40 + k % 3] = 0  # bad in several exposures
        if k == 3:  # cosmic rays in the data of one exposure
            raw[tb.PRE + 50:tb.PRE + 53, tb.PRE + 60] += 5000
        path = tmp / f"raw{k + 1}.fits"
        tb.write_raw(path, raw, exptime, dateobs=f"2026-01-01T18:0{k}:00.000")
        raws.append(path)
    cal = tmp / "cal"
    cal.mkdir()
    tb.make_calibrations(cal, np.random.default_rng(3), bias_level=False)
    return dict(tmp=tmp, raws=raws, cal={"vpoly": cal})


@tb.needs_eso
@pytest.mark.eso
@pytest.mark.parametrize("params", [
    {"combine": "average"},
    {"combine": "median"},
    {"combine": "minmax"},
    {"combine": "minmax", "nlow": 0, "nhigh": 2, "nkeep": 3},
    {"combine": "sigclip"},
    {"combine": "sigclip", "lsigma": 1.0, "hsigma": 1.5, "scale": True},
    {"combine": "average", "scale": True},
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_combined_image_equals_eso(five, params):
    tag = "comb_" + "_".join(f"{k}{v}" for k, v in params.items())
    theirs, _ = tb.eso_basicproc(five, tag, five["raws"], "vpoly", params)
    settings = make_settings(params)
    images = [tb.ours_processed(five, raw, "vpoly", settings) for raw in five["raws"]]
    ours = combine.combine_exposures(images, settings)
    tb.assert_same_as_eso(ours, theirs, f"combine {params}")
    if params.get("scale"):
        assert ours.header["EXPTIME"] == 10.0


# ---------------------------------------------------------------------------
# QC TWILIGHTm INPUTi / MASTER against ESO's muse_twilight product header


@pytest.mark.eso
@pytest.mark.parametrize("options,params", [
    ({}, {}),
    ({"dark": True, "badpix": True}, {"combine": "average", "scale": True}),
], ids=["default", "dark-badpix-average-scale"])
def test_twilight_qc_equals_eso(simulated_set, eso_twilight, options, params):
    from musetwilight.instrument import header_ifu
    from musetwilight.io import formats as io

    sim = simulated_set(**options)
    run = eso_twilight(options, params)
    assert run.returncode == 0, run.errors
    header = fits.getheader(run.product("DATACUBE_SKYFLAT.fits"))
    theirs = {k: header[k] for k in header
              if k.startswith("ESO QC TWILIGHT") and ("INPUT" in k or "MASTER" in k)}
    cards = {k: header.cards[k] for k in theirs}
    settings = make_settings(params)
    files = sim.files
    ours = {}
    for ifu in sorted({header_ifu(h) for h in io.scan_fits(files["SKYFLAT"][0])} - {None}):
        flat = io.read_muse_image(files["MASTER_FLAT"][0], ifu)
        badpix = [t for t in (io.read_badpix_table(p, ifu) for p in files.get("BADPIX_TABLE", [])) if t is not None]
        dark = io.read_muse_image(files["MASTER_DARK"][0], ifu) if files.get("MASTER_DARK") else None
        processed = basicproc.process_exposures(
            [io.read_raw_ifu(p, ifu) for p in files["SKYFLAT"]], settings,
            basicproc.Calibrations(io.read_muse_image(files["MASTER_BIAS"][0], ifu), flat, dark, badpix))
        images = processed.images
        master = combine.combine_exposures(images, settings)
        ours.update(combine.exposure_qc(images, ifu, processed.flat_zero))
        ours.update(combine.master_qc(master, ifu))
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if key.endswith("NSATURATED"):
            assert ours[key] == value, key
            continue
        # the product header holds these floats as ESO wrote them (7 significant digits)
        assert same_card_value(cards[key], ours[key]), (key, ours[key], cards[key].image)
