"""FITS readers and writers: ESO's IFU-matching rules, layouts, types and error handling."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from musefiles import file_matches_ifu, ifus_in_file, muse_image_hdus, write_hdulist_atomic, write_muse_image

from musetwilight.core.images import MuseImage
from musetwilight.errors import InputError
from musetwilight.instrument import ifu_of_extname
from musetwilight.io import formats as mio


def det_header(ifu: int = 1, gain: float = 1.1) -> fits.Header:
    """The detector keywords a raw CHANnn extension needs, with CPL's types."""
    h = fits.Header()
    h["EXTNAME"] = f"CHAN{ifu:02d}"
    h["HIERARCH ESO DET CHIP NAME"] = f"chip{ifu}"
    h["HIERARCH ESO DET CHIP ID"] = f"id{ifu}"
    for q, (x, y) in enumerate(((1, 1), (4096, 1), (4096, 4112), (1, 4112)), start=1):
        for key, value in (("X", x), ("Y", y), ("NX", 8), ("NY", 6), ("PRSCX", 2), ("PRSCY", 2),
                           ("OVSCX", 2), ("OVSCY", 2)):
            h[f"HIERARCH ESO DET OUT{q} {key}"] = value
        h[f"HIERARCH ESO DET OUT{q} GAIN"] = gain + 0.01 * q
    return h


def raw_primary() -> fits.PrimaryHDU:
    p = fits.PrimaryHDU()
    p.header["HIERARCH ESO DET BINX"] = 1
    p.header["HIERARCH ESO DET BINY"] = 1
    p.header["HIERARCH ESO DET CHIP NAME"] = "primary-chip"
    p.header["EXPTIME"] = 10.0
    return p


def raw_ifu_data(ifu: int, shape=(20, 24)) -> np.ndarray:
    ny, nx = shape
    return ((np.arange(ny * nx).reshape(ny, nx) * 97 + ifu * 1000) % 65536).astype(np.uint16)


def write_raw(path: Path, ifus=range(1, 25), shape=(20, 24)) -> Path:
    hdus = [raw_primary()]
    for ifu in ifus:
        hdus.append(fits.ImageHDU(raw_ifu_data(ifu, shape), header=det_header(ifu)))
    fits.HDUList(hdus).writeto(path)
    return path


def make_image(shape=(6, 5), seed=0, unit="count") -> MuseImage:
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 5, shape).astype(np.float32)
    dq = rng.integers(0, 2, shape).astype(np.uint32) << np.uint32(31)  # top bit: sign of int32
    dq[0, 0] = (1 << 5) | (1 << 13)
    stat = rng.uniform(1, 2, shape).astype(np.float32)
    header = fits.Header()
    header["HIERARCH ESO PRO CATG"] = "MASTER_BIAS"
    header["BUNIT"] = (unit, "unit comment")
    return MuseImage(data, dq, stat, header)


# ----------------------------------------------------------------------------- matching

@pytest.mark.parametrize("name, expected", [
    ("CHAN05", 5), ("CHAN05.DATA", 5), ("CHAN24.DQ", 24), ("CHAN1", None), ("CHAN", None),
    ("DATA", None), ("CHANxx", 0), ("CHAN 7", 7), ("chan05", None), (None, None), (5, None),
    ("CHAN261", 5),  # atoi stored in an unsigned char
])
def test_ifu_of_extname(name, expected):
    assert ifu_of_extname(name) == expected


def write_table_file(path: Path, ifus, pipefile: bool, primary_extname: str | None = None) -> Path:
    primary = fits.PrimaryHDU()
    if pipefile:
        primary.header["PIPEFILE"] = path.name
    if primary_extname:
        primary.header["EXTNAME"] = primary_extname
    hdus = [primary]
    for ifu in ifus:
        cols = [fits.Column("SliceNo", "J", array=np.arange(1, 4)),
                fits.Column("MSE", "D", array=np.full(3, float(ifu)))]
        hdus.append(fits.BinTableHDU.from_columns(cols, name=f"CHAN{ifu:02d}"))
    fits.HDUList(hdus).writeto(path)
    return path


def test_pipefile_merged_file_matches_only_its_ifus(tmp_path):
    path = write_table_file(tmp_path / "trace.fits", [2, 3], pipefile=True)
    with fits.open(path) as hdul:
        assert mio.find_ifu_hdu(hdul, 3) == 2
        assert mio.find_ifu_hdu(hdul, 2) == 1
        assert mio.find_ifu_hdu(hdul, 1) is None
        assert mio.find_ifu_hdu(hdul, 1, tag="GEOMETRY_TABLE") == 0
    assert ifus_in_file(path) == [2, 3]
    assert mio.read_ifu_table(path, 1) is None
    table = mio.read_ifu_table(path, 3)
    assert table.meta["extension"] == 2 and table.meta["extname"] == "CHAN03"
    assert table["MSE"][0] == 3.0


def test_generic_file_matches_every_ifu_and_uses_extension_1(tmp_path):
    path = write_table_file(tmp_path / "trace.fits", [2, 3], pipefile=False)
    assert file_matches_ifu(path, 7)
    # ESO reads extension 1 for an IFU the generic file has no extension for
    table = mio.read_ifu_table(path, 7)
    assert table.meta["extension"] == 1 and table["MSE"][0] == 2.0
    assert mio.read_ifu_table(path, 3)["MSE"][0] == 3.0


def test_per_ifu_file_with_chan_in_primary(tmp_path):
    path = write_table_file(tmp_path / "trace-05.fits", [], pipefile=True, primary_extname="CHAN05")
    fits.append(path, fits.BinTableHDU.from_columns([fits.Column("SliceNo", "J", array=[1, 2])]).data)
    assert ifus_in_file(path) == [5]
    assert not file_matches_ifu(path, 4)
    table = mio.read_ifu_table(path, 5)
    assert table.meta["extension"] == 1 and list(table["SliceNo"]) == [1, 2]
    # without PIPEFILE, a primary naming another IFU still rejects the file
    path2 = write_table_file(tmp_path / "trace-06.fits", [], pipefile=False, primary_extname="CHAN06")
    assert not file_matches_ifu(path2, 4)


def test_empty_table_is_an_error(tmp_path):
    path = tmp_path / "empty.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("SliceNo", "J", array=np.array([], dtype=np.int32))], name="CHAN01")]).writeto(path)
    with pytest.raises(InputError, match="empty.fits.*no rows"):
        mio.read_ifu_table(path, 1)


# ----------------------------------------------------------------------------- raw

def test_read_raw_ifu_bzero_uint16_and_merged_header(tmp_path):
    path = write_raw(tmp_path / "raw.fits", ifus=[1, 2, 3])
    with fits.open(path, do_not_scale_image_data=True) as hdul:  # stored as int16 + BZERO
        assert hdul[2].header["BITPIX"] == 16 and hdul[2].header["BZERO"] == 32768
    raw = mio.read_raw_ifu(path, 2)
    assert raw.ifu == 2 and raw.path == path
    assert raw.data.dtype == np.uint16 and raw.data.dtype.isnative
    np.testing.assert_array_equal(raw.data, raw_ifu_data(2))
    assert raw.data.max() > 32767  # values above int16 range survive
    h = raw.header
    assert h["EXTNAME"] == "CHAN02"
    assert h["ESO DET CHIP NAME"] == "chip2"  # extension wins over primary
    assert h["ESO DET BINX"] == 1 and h["EXPTIME"] == 10.0  # primary keywords kept
    assert h["BUNIT"] == "adu"
    assert "BZERO" not in h and "XTENSION" not in h and "NAXIS1" not in h


def test_read_raw_ifu_int32_and_float_kept(tmp_path):
    path = tmp_path / "raw32.fits"
    data = np.arange(30, dtype=np.int32).reshape(5, 6) - 7
    fits.HDUList([raw_primary(), fits.ImageHDU(data, header=det_header(1))]).writeto(path)
    raw = mio.read_raw_ifu(path, 1)
    assert raw.data.dtype == np.int32
    np.testing.assert_array_equal(raw.data, data)


def test_raw_missing_ifu_and_keywords(tmp_path):
    path = write_raw(tmp_path / "raw.fits", ifus=[1])
    assert file_matches_ifu(path, 2)  # raw data carry no PIPEFILE: generic for matching
    assert mio.has_ifu_extension(path, 1) and not mio.has_ifu_extension(path, 2)
    with pytest.raises(InputError, match=r"raw\.fits.*IFU 2"):
        mio.read_raw_ifu(path, 2)
    bad = tmp_path / "nobin.fits"
    primary = raw_primary()
    del primary.header["ESO DET BINY"]
    ext = det_header(1)
    ext["HIERARCH ESO DET OUT3 GAIN"] = 1  # integer: CPL's get_double refuses it
    fits.HDUList([primary, fits.ImageHDU(raw_ifu_data(1), header=ext)]).writeto(bad)
    with pytest.raises(InputError) as info:
        mio.read_raw_ifu(bad, 1)
    message = str(info.value)
    assert "nobin.fits" in message and "ESO DET BINY is missing" in message
    assert "ESO DET OUT3 GAIN = 1 is not a real" in message
    assert mio.read_raw_ifu(bad, 1, check_keywords=False).data.shape == (20, 24)


def test_not_fits_and_truncated_files(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("this is not FITS\n" * 200)
    with pytest.raises(InputError, match="notes.fits"):
        mio.read_raw_ifu(text, 1)
    with pytest.raises(InputError, match="missing.fits.*does not exist"):
        mio.read_muse_image(tmp_path / "missing.fits")
    path = write_raw(tmp_path / "raw.fits", ifus=[1, 2])
    blob = path.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(blob[: len(blob) - 2880 - 100])  # inside the data of CHAN02
    with pytest.raises(InputError, match="cut.fits: truncated"):
        mio.read_raw_ifu(cut, 2)
    assert mio.read_raw_ifu(cut, 1).data.shape == (20, 24)  # what comes before is still readable
    cut_header = tmp_path / "cuthdr.fits"
    with fits.open(path) as hdul:
        start = hdul.fileinfo(2)["hdrLoc"]
    cut_header.write_bytes(blob[: start + 1000])  # inside the header of CHAN02
    with pytest.raises(InputError, match="cuthdr.fits: truncated"):
        ifus_in_file(cut_header)


def test_reading_one_ifu_leaves_the_others_alone(tmp_path):
    """Lazy + memory-mapped: the IFU comes out right even when every other extension's
    data are garbage or cut off, and far less memory than the file is allocated."""
    shape = (200, 256)
    path = write_raw(tmp_path / "raw.fits", shape=shape)
    with fits.open(path) as hdul:
        info = [hdul.fileinfo(i) for i in range(25)]
    blob = bytearray(path.read_bytes())
    for index in range(1, 25):
        if index != 5:
            loc = info[index]["datLoc"]
            blob[loc:loc + info[index]["datSpan"]] = b"\xff" * info[index]["datSpan"]
    cut = tmp_path / "damaged.fits"
    cut.write_bytes(bytes(blob[: info[7]["datLoc"] + 10]))  # CHAN07 onwards cut off
    tracemalloc.start()
    raw = mio.read_raw_ifu(cut, 5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(raw.data, raw_ifu_data(5, shape))
    one_extension = shape[0] * shape[1] * 2
    assert peak < 4 * one_extension < os.path.getsize(path) / 5


# ----------------------------------------------------------------------------- MUSE images

def test_muse_image_round_trip_per_ifu(tmp_path):
    image = make_image()
    image.header["EXTNAME"] = "CHAN03"
    image.header["CTYPE1"] = "PIXEL"
    path = write_muse_image(tmp_path / "MASTER_BIAS-03.fits", image)
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        assert [h.name for h in hdul] == ["CHAN03", "DATA", "DQ", "STAT"]
        assert hdul[0].header["NAXIS"] == 0
        assert hdul[2].header["BITPIX"] == 32 and "BZERO" not in hdul[2].header
        assert hdul[1].header["BITPIX"] == -32 and hdul[3].header["BITPIX"] == -32
        assert "BUNIT" not in hdul[0].header and "CTYPE1" not in hdul[0].header
        assert hdul[1].header["CTYPE1"] == "PIXEL"
        assert hdul[1].header["BUNIT"] == "count" and hdul[3].header["BUNIT"] == "(count)**2"
        assert hdul[2].header["HDUCLAS2"] == "QUALITY" and hdul[2].header["QUALMASK"] == 0xFFFFFFFF
        assert hdul[1].header["ERRDATA"] == "STAT" and hdul[3].header["SCIDATA"] == "DATA"
        assert "CHECKSUM" in hdul[1].header and "DATASUM" in hdul[0].header
        assert hdul[2].data[0, 0] == (1 << 5) | (1 << 13)
        assert (hdul[2].data < 0).any()  # bit 31 stored as the int32 sign
    back = mio.read_muse_image(path)
    assert back.data.dtype == np.float32 and back.stat.dtype == np.float32 and back.dq.dtype == np.uint32
    np.testing.assert_array_equal(back.data, image.data)
    np.testing.assert_array_equal(back.dq, image.dq)
    np.testing.assert_array_equal(back.stat, image.stat)
    assert back.header["BUNIT"] == "count" and back.header["EXTNAME"] == "CHAN03"
    assert back.header["ESO PRO CATG"] == "MASTER_BIAS"
    assert ifus_in_file(path) == [3]
    assert file_matches_ifu(path, 3) and not file_matches_ifu(path, 4)


def write_merged(path: Path, ifus=(1, 2)) -> Path:
    primary = fits.PrimaryHDU()
    primary.header["PIPEFILE"] = path.name
    primary.header["HIERARCH ESO PRO CATG"] = "MASTER_FLAT"
    primary.header["HIERARCH ESO DET CHIP NAME"] = "from-primary"
    hdus = [primary]
    for ifu in ifus:
        image = make_image(seed=ifu)
        image.data += ifu
        extra = fits.Header()
        extra["HIERARCH ESO QC FLAT MASTER INTFLUX"] = 1000.0 * ifu
        extra["HIERARCH ESO DET CHIP NAME"] = f"chip{ifu}"
        extra["OBJECT"] = "not merged"
        hdus += muse_image_hdus(image, prefix=f"CHAN{ifu:02d}.", data_keywords=extra)
    write_hdulist_atomic(hdus, path)
    return path


def test_muse_image_merged_layout_header_rule(tmp_path):
    path = write_merged(tmp_path / "MASTER_FLAT.fits")
    image = mio.read_muse_image(path, ifu=2)
    expected = make_image(seed=2)
    np.testing.assert_array_equal(image.data, expected.data + 2)
    np.testing.assert_array_equal(image.dq, expected.dq)
    h = image.header
    assert h["EXTNAME"] == "CHAN02" and h["BUNIT"] == "count"
    assert h["ESO QC FLAT MASTER INTFLUX"] == 2000.0
    assert h["ESO DET CHIP NAME"] == "from-primary"  # CPL appends; the first occurrence wins
    assert "OBJECT" not in h  # non-ESO keywords of CHANnn.DATA are ignored
    assert file_matches_ifu(path, 1) and not file_matches_ifu(path, 3)
    with pytest.raises(InputError, match="MASTER_FLAT.fits.*CHAN03.DATA"):
        mio.read_muse_image(path, ifu=3)
    with pytest.raises(InputError, match="no DATA extension"):
        mio.read_muse_image(path)


def test_muse_image_missing_stat_or_bunit(tmp_path, caplog):
    path = write_muse_image(tmp_path / "img.fits", make_image())
    with fits.open(path) as hdul:
        del hdul[1].header["BUNIT"]
        nostat = fits.HDUList([hdul[0].copy(), hdul[1].copy(), hdul[2].copy()])
        nostat.writeto(tmp_path / "nostat.fits")
        fits.HDUList([h.copy() for h in hdul]).writeto(tmp_path / "nobunit.fits")
    with pytest.raises(InputError, match="nostat.fits.*STAT"):
        mio.read_muse_image(tmp_path / "nostat.fits")
    image = mio.read_muse_image(tmp_path / "nobunit.fits")
    assert "BUNIT" not in image.header
    assert "No BUNIT" in caplog.text


# ----------------------------------------------------------------------------- tables, mask

def badpix_file(path: Path, value_format="E", status_format="J", pipefile=True) -> Path:
    primary = fits.PrimaryHDU()
    if pipefile:
        primary.header["PIPEFILE"] = path.name
    cols = [fits.Column("xpos", "J", array=[3, 5]), fits.Column("ypos", "I", array=[4, 6]),
            fits.Column("status", status_format, array=[1 << 8, 1 << 29]),
            fits.Column("value", value_format, array=[0.5, 1.5])]
    fits.HDUList([primary, fits.BinTableHDU.from_columns(cols, name="CHAN02")]).writeto(path)
    return path


def test_badpix_table_types(tmp_path):
    table = mio.read_badpix_table(badpix_file(tmp_path / "bp.fits"), 2)
    assert list(table["xpos"]) == [3, 5] and list(table["status"]) == [256, 1 << 29]
    assert table["xpos"].dtype.isnative
    assert mio.read_badpix_table(tmp_path / "bp.fits", 1) is None  # PIPEFILE, no CHAN01
    # generic file (no PIPEFILE) matches IFU 1 but has no CHAN01 extension: skipped as in ESO
    assert mio.read_badpix_table(badpix_file(tmp_path / "generic.fits", pipefile=False), 1) is None
    with pytest.raises(InputError, match=r"bpd.fits\[CHAN02\].*'value' format 'D'.*not 'float'"):
        mio.read_badpix_table(badpix_file(tmp_path / "bpd.fits", value_format="D"), 2)
    with pytest.raises(InputError, match="'status' format 'K'"):
        mio.read_badpix_table(badpix_file(tmp_path / "bpk.fits", status_format="K"), 2)


def test_geometry_table_columns(tmp_path):
    n = 48
    cols = [fits.Column("SubField", "J", array=np.ones(n)), fits.Column("SliceCCD", "J", array=np.arange(1, n + 1)),
            fits.Column("SliceSky", "J", array=np.arange(1, n + 1)), fits.Column("x", "D", array=np.zeros(n)),
            fits.Column("y", "D", array=np.arange(n) * 1.0), fits.Column("angle", "D", array=np.zeros(n)),
            fits.Column("width", "D", array=np.full(n, 75.0)), fits.Column("xerr", "D", array=np.zeros(n))]
    path = tmp_path / "geo.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    table = mio.read_geometry_table(path)
    assert len(table) == 48 and table["width"][0] == 75.0 and "xerr" in table.colnames
    bad = tmp_path / "geo_float.fits"
    cols[6] = fits.Column("width", "E", array=np.full(n, 75.0))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols[:-1])]).writeto(bad)
    with pytest.raises(InputError, match="geo_float.fits.*'width'.*not 'double'"):
        mio.read_geometry_table(bad)


def test_vignetting_mask(tmp_path):
    values = np.zeros((8, 6), np.int16)
    values[:2, :3] = 1
    fits.PrimaryHDU(values).writeto(tmp_path / "vign.fits")
    mask = mio.read_vignetting_mask(tmp_path / "vign.fits")
    assert mask.mask.dtype == bool and mask.mask.sum() == 6 and mask.mask[0, 0] and not mask.mask[2, 0]
    fits.PrimaryHDU(values.astype(np.float32)).writeto(tmp_path / "vignf.fits")
    with pytest.raises(InputError, match="vignf.fits.*integer"):
        mio.read_vignetting_mask(tmp_path / "vignf.fits")


# ----------------------------------------------------------------------------- simulated set

@pytest.fixture(scope="module")
def simulated(simulated_set):
    """A mini set with every optional input (shared with the simulator's tests, conftest.py)."""
    return simulated_set(illum=True, dark=True, badpix=True, vignetting=True, saturate=True)


def test_readers_read_every_simulated_file(simulated):
    from musetwilight.io.frames import parse_sof

    frames = parse_sof(simulated.sof)
    tags = sorted({f.tag for f in frames})
    assert tags == sorted(["SKYFLAT", "ILLUM", "MASTER_BIAS", "MASTER_DARK", "MASTER_FLAT", "TRACE_TABLE",
                           "WAVECAL_TABLE", "GEOMETRY_TABLE", "BADPIX_TABLE", "VIGNETTING_MASK"])
    ifus = simulated.ifus
    absent = next(n for n in range(1, 25) if n not in ifus)
    raw_shape = trimmed_shape = None
    for frame in frames:
        path, tag = frame.path, frame.tag
        if tag == "GEOMETRY_TABLE":
            geo = mio.read_geometry_table(path)
            assert len(geo) == 24 * 48 and sorted(set(geo["SubField"])) == list(range(1, 25))
            continue
        if tag == "VIGNETTING_MASK":
            mask = mio.read_vignetting_mask(path)
            assert mask.mask.ndim == 2 and 0 < mask.mask.sum() < mask.mask.size
            continue
        assert ifus_in_file(path) == ifus, path
        for ifu in ifus:
            if tag in ("SKYFLAT", "ILLUM"):
                raw = mio.read_raw_ifu(path, ifu)
                h = raw.header
                size = [2 * (h[f"ESO DET OUT1 PRSC{a}"] + h[f"ESO DET OUT1 N{a}"] + h[f"ESO DET OUT1 OVSC{a}"])
                        // h[f"ESO DET BIN{a}"] for a in "YX"]
                assert raw.data.shape == tuple(size) and raw.data.dtype == np.uint16
                assert h["EXTNAME"] == f"CHAN{ifu:02d}"
                raw_shape = raw.data.shape
                trimmed_shape = (2 * h["ESO DET OUT1 NY"], 2 * h["ESO DET OUT1 NX"])
            elif tag.startswith("MASTER_"):
                image = mio.read_muse_image(path, ifu)
                assert image.header["ESO PRO CATG"] == tag and image.header["EXTNAME"] == f"CHAN{ifu:02d}"
                assert image.data.dtype == np.float32 and image.dq.dtype == np.uint32
                assert np.isfinite(image.data).all() and (image.stat >= 0).all()
                trimmed = image.data.shape
            elif tag in ("TRACE_TABLE", "WAVECAL_TABLE"):
                table = mio.read_ifu_table(path, ifu)
                assert len(table) == 48 and list(table["SliceNo"]) == list(range(1, 49))
                assert table.meta["extname"] == f"CHAN{ifu:02d}"
                assert table.colnames[-1] == ("MSE" if tag == "WAVECAL_TABLE" else "MSE2")
            elif tag == "BADPIX_TABLE":
                bad = mio.read_badpix_table(path, ifu)
                assert len(bad) > 0 and bad["xpos"].min() >= 1 and bad["ypos"].min() >= 1
        if tag in ("MASTER_BIAS", "TRACE_TABLE", "WAVECAL_TABLE"):  # merged products with PIPEFILE
            assert not file_matches_ifu(path, absent)
    assert trimmed == trimmed_shape and raw_shape[0] > trimmed[0]
