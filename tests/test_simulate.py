"""The simulator writes complete, self-consistent MUSE twilight sets."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from numpy.polynomial import Polynomial

from musetwilight.shells import cli
from musetwilight.tools.simulate import CCD_TO_SKY, LAYOUTS, build_instrument, simulate_dataset, twilight_spectrum

MINI = LAYOUTS["mini"]


@pytest.fixture(scope="module")
def everything(simulated_set):
    """One mini set with every optional input."""
    return simulated_set(illum=True, dark=True, badpix=True, vignetting=True, saturate=True)


def _merged_ifus(path, suffix=""):
    with fits.open(path) as hdul:
        return [int(h.name[4:6]) for h in hdul[1:] if h.name.endswith(suffix)]


def test_sof_lists_every_file_with_its_tag(everything):
    lines = [line.split() for line in everything.sof.read_text().splitlines()]
    tags = [tag for _, tag in lines]
    assert tags.count("SKYFLAT") == 3
    for tag in ("ILLUM", "MASTER_BIAS", "MASTER_DARK", "MASTER_FLAT", "TRACE_TABLE", "WAVECAL_TABLE",
                "GEOMETRY_TABLE", "BADPIX_TABLE", "VIGNETTING_MASK"):
        assert tags.count(tag) == 1, tag
    for path, tag in lines:
        assert fits.getheader(path) is not None
        assert any(str(p.resolve()) == path for p in everything.files[tag])


def test_raw_exposures_have_real_muse_layout(everything):
    ny, nx = MINI.raw_shape
    assert (ny, nx) == (2 * (32 + 128 + 32), 2 * (32 + 256 + 32))
    for tag in ("SKYFLAT", "ILLUM"):
        for path in everything.files[tag]:
            with fits.open(path, do_not_scale_image_data=True) as hdul:
                assert hdul[0].header["NAXIS"] == 0
                assert [h.name for h in hdul[1:]] == [f"CHAN{i:02d}" for i in everything.ifus]
                primary = hdul[0].header
                assert isinstance(primary["EXPTIME"], float)
                assert isinstance(primary["MJD-OBS"], float)
                assert primary["ESO INS MODE"] == everything.mode
                assert primary["ESO DPR CATG"] == "CALIB"
                assert isinstance(primary["ESO DET BINX"], int) and primary["ESO DET BINX"] == 1
                assert isinstance(primary["ESO DET READ CURID"], int)
                if tag == "ILLUM":
                    assert primary["ESO TPL ID"] == "MUSE_wfm_cal_illum"
                else:
                    assert primary["ESO DPR TYPE"] == "FLAT,SKY"
                for ext in hdul[1:]:
                    h = ext.header
                    assert (h["BITPIX"], h["BZERO"]) == (16, 32768)
                    assert ext.data.shape == (ny, nx)
                    assert h["ESO DET CHIP NAME"] and h["ESO DET CHIP ID"] and h["ESO DET CHIP LIVE"] is True
                    ports = [(h[f"ESO DET OUT{q} X"], h[f"ESO DET OUT{q} Y"]) for q in range(1, 5)]
                    assert ports == [(1, 1), (4096, 1), (4096, 4112), (1, 4112)]
                    for q in range(1, 5):
                        for key, value in (("NX", 256), ("NY", 128), ("PRSCX", 32), ("PRSCY", 32),
                                           ("OVSCX", 32), ("OVSCY", 32)):
                            card = h[f"ESO DET OUT{q} {key}"]
                            assert isinstance(card, int) and card == value
                        assert isinstance(h[f"ESO DET OUT{q} GAIN"], float)
                        assert isinstance(h[f"ESO DET OUT{q} RON"], float)


def test_master_images_are_merged_muse_images(everything):
    shape = (MINI.height, MINI.width)
    for tag, unit in (("MASTER_BIAS", "adu"), ("MASTER_DARK", "count"), ("MASTER_FLAT", "count")):
        with fits.open(everything.files[tag][0]) as hdul:
            assert hdul[0].header["ESO PRO CATG"] == tag
            assert hdul[0].header["PIPEFILE"]
            names = [h.name for h in hdul[1:]]
            assert names == [f"CHAN{i:02d}.{e}" for i in everything.ifus for e in ("DATA", "DQ", "STAT")]
            for i in everything.ifus:
                data, dq, stat = (hdul[f"CHAN{i:02d}.{e}"] for e in ("DATA", "DQ", "STAT"))
                assert data.data.dtype == np.dtype(">f4") and data.data.shape == shape
                assert dq.data.dtype == np.dtype(">i4") and stat.data.dtype == np.dtype(">f4")
                assert data.header["BUNIT"] == unit
                assert data.header["ESO DET CHIP NAME"] == f"SIM{i:02d}"
                if tag == "MASTER_BIAS":
                    for q in range(1, 5):
                        assert isinstance(data.header[f"ESO DRS MUSE OVSC{q} MEAN"], float)
                        assert 2.0 < data.header[f"ESO DRS MUSE OVSC{q} STDEV"] < 4.0
                    # vpoly-corrected master bias: level near zero
                    assert abs(np.median(data.data)) < 1.0
                if tag == "MASTER_FLAT":
                    assert isinstance(data.header["ESO QC FLAT MASTER INTFLUX"], float)
                    assert np.median(data.data) == pytest.approx(1.0, abs=0.02)
    bias = fits.getheader(everything.files["MASTER_BIAS"][0])
    params = {bias[f"ESO PRO REC1 PARAM{k} NAME"]: bias[f"ESO PRO REC1 PARAM{k} VALUE"] for k in range(1, 15)}
    assert params["overscan"] == "vpoly" and params["ovscreject"] == "dcr"
    assert params["ovscsigma"] == "30" and params["ovscignore"] == "3"  # as muse_bias writes them
    assert fits.getheader(everything.files["MASTER_DARK"][0])["EXPTIME"] == 3600.0
    assert fits.getheader(everything.files["MASTER_FLAT"][0])["ESO INS MODE"] == everything.mode


def test_calibration_tables_have_eso_columns(everything):
    with fits.open(everything.files["TRACE_TABLE"][0]) as hdul:
        assert [h.name for h in hdul[1:]] == [f"CHAN{i:02d}" for i in everything.ifus]
        cols = hdul[1].columns
        expected = ["SliceNo", "Width"] + [f"tc{k}_{n:02d}" for k in range(3) for n in range(6)]
        expected = expected[:8] + ["MSE0"] + expected[8:14] + ["MSE1"] + expected[14:] + ["MSE2"]
        assert cols.names == expected
        assert cols["SliceNo"].format == "J" and cols["Width"].format == "E" and cols["tc1_00"].format == "D"
        assert list(hdul[1].data["SliceNo"]) == list(range(1, 49))
    with fits.open(everything.files["WAVECAL_TABLE"][0]) as hdul:
        names = hdul[1].columns.names
        assert names[0] == "SliceNo" and names[-1] == "MSE" and names[-2] == "wlc26"
        assert names[1:-1] == [f"wlc{x}{y}" for x in range(3) for y in range(7)]
    with fits.open(everything.files["GEOMETRY_TABLE"][0]) as hdul:
        geo = hdul[1].data
        assert len(geo) == 24 * 48
        assert hdul[1].columns["SubField"].format == "J" and hdul[1].columns["x"].format == "D"
        for ifu in range(1, 25):
            rows = geo[geo["SubField"] == ifu]
            assert sorted(rows["SliceCCD"]) == list(range(1, 49))
            assert list(rows["SliceSky"][np.argsort(rows["SliceCCD"])]) == list(CCD_TO_SKY)
    with fits.open(everything.files["BADPIX_TABLE"][0]) as hdul:
        for i, ext in zip(everything.ifus, hdul[1:]):
            assert ext.name == f"CHAN{i:02d}"
            assert [c.format for c in ext.columns] == ["J", "J", "J", "E"]
            assert ext.columns.names == ["xpos", "ypos", "status", "value"]
            t = ext.data
            # raw (untrimmed) coordinates: never in a pre- or overscan
            assert np.all((t["xpos"] > 32) & (t["xpos"] <= 640 - 32))
            assert not np.any((t["xpos"] > 32 + 256) & (t["xpos"] <= 32 + 256 + 64))
            assert not np.any((t["ypos"] > 32 + 128) & (t["ypos"] <= 32 + 128 + 64))
    mask = fits.open(everything.files["VIGNETTING_MASK"][0])[0]
    grid = everything.truth()["cube_grid"]
    # ESO pastes the mask's most-masked quadrant into the cube's corner: quadrant <= cube
    assert mask.data.shape == (2 * (grid["ny"] - 1), 2 * (grid["nx"] - 1))
    assert mask.data.dtype.kind == "i"
    ny, nx = mask.data.shape
    assert mask.data[: ny // 2, : nx // 2].sum() == mask.data.sum() > 25


def test_trace_edges_stay_on_the_ccd_at_both_scales():
    assert LAYOUTS["full"].raw_shape == (4240, 4224)
    assert (LAYOUTS["full"].width, LAYOUTS["full"].height) == (4096, 4112)
    for layout in LAYOUTS.values():
        inst = build_instrument(layout, "WFM-NOAO-N", seed=5)
        y = np.arange(1, layout.height + 1)
        for ifu in (1, 24):
            left = [Polynomial(inst.trace[ifu][s, 1])(y) for s in range(48)]
            right = [Polynomial(inst.trace[ifu][s, 2])(y) for s in range(48)]
            assert min(v.min() for v in left) >= 1 and max(v.max() for v in right) <= layout.width
            # slices do not overlap, and are 48 per CCD
            for s in range(47):
                assert np.all(right[s] < left[s + 1])


def test_truth_describes_the_set(everything):
    truth = everything.truth()
    assert truth["options"]["ifus"] == everything.ifus == [1, 2, 3]
    assert set(truth["ifus"]) == {"1", "2", "3"}
    grid = truth["cube_grid"]
    assert grid["nx"] >= 5 and grid["ny"] >= 7
    assert np.array(truth["field_illumination"]["map"]).shape == (grid["ny"], grid["nx"])
    vign = np.array(truth["vignetting"]["map"])
    assert vign.min() < 0.85 and vign.max() == 1.0
    for ifu in truth["ifus"].values():
        assert len(ifu["slice_efficiency"]) == 48
        assert len(ifu["cosmic_rays"]["positions"]) == 3
        assert ifu["cosmic_rays"]["count"] == [len(p) for p in ifu["cosmic_rays"]["positions"]]
        # --saturate: exposure 1 has saturated pixels, but fewer than ESO's 0.1 % warning limit
        assert 0 < ifu["nsaturated"][0] < 0.001 * MINI.raw_shape[0] * MINI.raw_shape[1]
        assert ifu["nsaturated"][1:] == [0, 0]
    assert truth["twilight_spectrum"]["value"][0] > truth["twilight_spectrum"]["value"][-1]


def test_same_seed_same_data_other_seed_other_data(tmp_path, simulated_set):
    reference = simulated_set()
    again = simulate_dataset(tmp_path / "again", seed=0)
    other = simulate_dataset(tmp_path / "other", seed=1)
    a = fits.getdata(reference.files["SKYFLAT"][1], "CHAN02")
    assert np.array_equal(a, fits.getdata(again.files["SKYFLAT"][1], "CHAN02"))
    assert not np.array_equal(a, fits.getdata(other.files["SKYFLAT"][1], "CHAN02"))
    assert again.truth()["ifus"] == reference.truth()["ifus"]
    # an IFU's data do not depend on which other IFUs are simulated
    subset = simulate_dataset(tmp_path / "subset", seed=0, ifus=[2, 1])
    assert subset.ifus == [1, 2]
    assert np.array_equal(a, fits.getdata(subset.files["SKYFLAT"][1], "CHAN02"))


def _quadrant1(path, ifu):
    raw = fits.getdata(path, f"CHAN{ifu:02d}").astype(float)
    overscan = raw[32:32 + 128, 32 + 256 + 3:32 + 256 + 32]  # vertical overscan, ignore 3 columns
    data = raw[32:32 + 128, 32:32 + 256]
    return data, overscan


def test_overscan_level_and_gain_are_recovered_from_raw_numbers(simulated_set):
    """Photon-transfer check: from two SKYFLATs of known flux ratio, the variance of their scaled
    difference gives the gain (e-/adu) in the header; the overscan gives bias level and noise."""
    sim = simulated_set()
    truth = sim.truth()["ifus"]["1"]
    bias = fits.getdata(sim.files["MASTER_BIAS"][0], "CHAN01.DATA")[:128, :256].astype(float)
    d1, o1 = _quadrant1(sim.files["SKYFLAT"][0], 1)
    d2, o2 = _quadrant1(sim.files["SKYFLAT"][1], 1)
    assert o1.mean() == pytest.approx(truth["bias_level"][0], abs=3.0)
    assert np.std(o1 - o1.mean(axis=1, keepdims=True)) == pytest.approx(truth["ron_adu"][0], rel=0.05)
    s1 = d1 - np.median(o1, axis=1, keepdims=True) - bias
    s2 = d2 - np.median(o2, axis=1, keepdims=True) - bias
    scale = truth["exposure_scale"][0] / truth["exposure_scale"][1]
    lit = s2 > 2000
    diff = (s1 - scale * s2)[lit]
    level = (s1 + scale**2 * s2)[lit]
    keep = np.ones(diff.size, dtype=bool)
    for _ in range(3):  # drop cosmic rays and trap columns
        keep = np.abs(diff - diff[keep].mean()) < 5 * diff[keep].std()
    ron = truth["ron_adu"][0]
    gain = level[keep].mean() / (diff[keep].var() - (1 + scale**2) * ron**2)
    header_gain = fits.getheader(sim.files["SKYFLAT"][0], "CHAN01")["ESO DET OUT1 GAIN"]
    assert gain == pytest.approx(header_gain, rel=0.05)


def test_raw_flux_follows_calibrations_and_spectrum(simulated_set):
    """Slice-centre pixels of the raw frame, converted with the header gain, the master bias and
    flat, equal the truth model evaluated with the TRACE/WAVECAL/GEOMETRY tables."""
    sim = simulated_set()
    truth = sim.truth()
    t1 = truth["ifus"]["1"]
    trace = fits.getdata(sim.files["TRACE_TABLE"][0], "CHAN01")
    wave = fits.getdata(sim.files["WAVECAL_TABLE"][0], "CHAN01")
    geo = fits.getdata(sim.files["GEOMETRY_TABLE"][0], 1)
    geo = geo[geo["SubField"] == 1]
    flat = fits.getdata(sim.files["MASTER_FLAT"][0], "CHAN01.DATA").astype(float)
    bias = fits.getdata(sim.files["MASTER_BIAS"][0], "CHAN01.DATA").astype(float)
    gain = fits.getheader(sim.files["SKYFLAT"][0], "CHAN01")["ESO DET OUT1 GAIN"]
    d1, o1 = _quadrant1(sim.files["SKYFLAT"][0], 1)
    counts = (d1 - np.median(o1, axis=1, keepdims=True) - bias[:128, :256]) * gain / flat[:128, :256]
    c = truth["field_illumination"]["coeffs"]
    ratios = []
    for s in range(4, 20):  # slices of quadrant 1
        left = Polynomial([trace[f"tc1_{n:02d}"][s] for n in range(6)])
        right = Polynomial([trace[f"tc2_{n:02d}"][s] for n in range(6)])
        for y in range(10, 121, 5):
            x = int(round((left(y) + right(y)) / 2))
            lam = sum(wave[f"wlc{i}{j}"][s] * x**i * y**j for i in range(3) for j in range(7))
            row = geo[geo["SliceCCD"] == s + 1][0]
            xc = (left(y) + right(y)) / 2
            dx = (xc - x) / (right(y) - left(y)) * row["width"]
            u = (dx * np.cos(np.radians(row["angle"])) + row["x"]) / truth["field_illumination"]["xscale"]
            v = (dx * np.sin(np.radians(row["angle"])) + row["y"]) / truth["field_illumination"]["yscale"]
            field = 1 + c["a10"] * u + c["a01"] * v + c["a20"] * u * u + c["a11"] * u * v + c["a02"] * v * v
            model = (twilight_spectrum(lam) * t1["slice_efficiency"][s] * t1["throughput"] * field
                     * t1["rate_scale_e_per_s"] * t1["exposure_scale"][0])
            ratios.append(counts[y - 1, x - 1] / model)
    ratios = np.array(ratios)
    assert np.median(ratios) == pytest.approx(1.0, abs=0.005)
    assert np.percentile(np.abs(ratios - 1), 90) < 0.03


def test_nfm_set_includes_ifus_23_and_24_and_vignettes_the_top(simulated_set):
    sim = simulated_set(mode="NFM-AO-N")
    assert sim.ifus == [1, 23, 24]
    truth = sim.truth()
    assert truth["vignetting"]["model"]["kind"] == "top"
    vign = np.array(truth["vignetting"]["map"])
    assert vign[-1].mean() < 0.7 and vign[0].min() == 1.0
    assert fits.getheader(sim.files["SKYFLAT"][0])["ESO TPL ID"].startswith("MUSE_nfm")


def test_invalid_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        simulate_dataset(tmp_path, mode="WFM")
    with pytest.raises(ValueError, match="scale"):
        simulate_dataset(tmp_path, scale="huge")
    with pytest.raises(ValueError, match="IFU"):
        simulate_dataset(tmp_path, ifus=[0, 1])


def test_cli_writes_a_set(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["simulate", "--out", str(out), "--ifus", "1,5", "--seed", "4", "--nexp", "4",
                     "--dark"]) == 0
    assert str(out) in capsys.readouterr().out
    sof = (out / "twilight.sof").read_text().split()
    assert sof.count("SKYFLAT") == 4 and "MASTER_DARK" in sof
    assert _merged_ifus(out / "MASTER_BIAS.fits", ".DATA") == [1, 5]


def test_ao_modes_darken_the_nad_notch_range(simulated_set):
    """In AO modes the sky passes the NaD notch filter: ~2 % transmission in its range."""
    noao = simulated_set()
    ao = simulated_set(mode="WFM-AO-N")
    wave = fits.getdata(ao.files["WAVECAL_TABLE"][0], "CHAN01")
    trace = fits.getdata(ao.files["TRACE_TABLE"][0], "CHAN01")
    s = 10
    x = int(round(sum(trace[f"tc0_{n:02d}"][s] * 100.0**n for n in range(6))))
    rows = np.arange(1, 129)
    lam = sum(wave[f"wlc{i}{j}"][s] * x**i * rows.astype(float)**j for i in range(3) for j in range(7))
    d_ao, o_ao = _quadrant1(ao.files["SKYFLAT"][0], 1)
    d_no, o_no = _quadrant1(noao.files["SKYFLAT"][0], 1)
    ratio = ((d_ao - np.median(o_ao, axis=1, keepdims=True))[:, x - 1]
             / (d_no - np.median(o_no, axis=1, keepdims=True))[:, x - 1])
    notch = (lam > 5825) & (lam < 5946)
    outside = (lam < 5700) | (lam > 6100)
    assert notch.sum() >= 3
    assert np.all(ratio[notch] < 0.1)
    assert np.median(ratio[outside]) == pytest.approx(1.0, abs=0.05)
