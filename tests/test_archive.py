"""Archive inputs (tile-compressed .fits.fz raws, gzipped files), archive-style simulated sets,
and the default worker count (OMP_NUM_THREADS, CPU affinity)."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
from astropy.io import fits

from musetwilight import recipe, threads
from musetwilight.errors import InputError
from musetwilight.io import formats
from musetwilight.io.frames import write_sof


def _products(out):
    return {name: fits.open(out / name) for name in ("DATACUBE_SKYFLAT.fits", "TWILIGHT_CUBE.fits")}


def test_fpacked_raws_and_gzipped_calibrations_give_the_same_products_bit_for_bit(simulated_set, tmp_path):
    plain = simulated_set(archive=True, illum=True)
    packed = simulated_set(fpack=True, illum=True)
    assert [p.name + ".fz" for p in plain.files["SKYFLAT"]] == [p.name for p in packed.files["SKYFLAT"]]
    with fits.open(packed.files["SKYFLAT"][0]) as hdul:
        assert isinstance(hdul[1], fits.CompImageHDU) and hdul[1].compression_type == "RICE_1"
    entries = [(p, "SKYFLAT") for p in packed.files["SKYFLAT"]] + [(packed.files["ILLUM"][0], "ILLUM")]
    for tag in ("MASTER_BIAS", "MASTER_FLAT", "TRACE_TABLE", "WAVECAL_TABLE", "GEOMETRY_TABLE"):
        target = tmp_path / f"{tag}.fits.gz"
        with open(plain.files[tag][0], "rb") as source, gzip.open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
        entries.append((target, tag))
    reference = recipe.run(plain.sof, {}, tmp_path / "plain")
    archive = recipe.run(write_sof(tmp_path / "archive.sof", entries), {}, tmp_path / "archive")
    assert reference.paths.keys() == archive.paths.keys()
    ours, theirs = _products(tmp_path / "plain"), _products(tmp_path / "archive")
    for name in ours:
        assert [h.name for h in ours[name]] == [h.name for h in theirs[name]]
        for a, b in zip(ours[name], theirs[name]):
            if a.data is not None:
                assert a.data.tobytes() == b.data.tobytes(), (name, a.name)
        assert ours[name][0].header["DATAMD5"] == theirs[name][0].header["DATAMD5"]
        assert theirs[name][0].header["ESO PRO REC1 RAW1 NAME"].endswith(".fits.fz")  # as ESO records it
        assert theirs[name][0].header["ESO PRO REC1 CAL1 NAME"].endswith(".fits.gz")


def test_truncated_compressed_files_are_still_errors(simulated_set, tmp_path):
    packed = simulated_set(fpack=True, illum=True)
    data = packed.files["SKYFLAT"][0].read_bytes()
    cut = tmp_path / "cut.fits.fz"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(InputError, match=r"cut.fits.fz: truncated FITS file"):
        formats.scan_fits(cut)
    broken = tmp_path / "broken.fits.gz"
    broken.write_bytes(gzip.compress(data)[:-2000])
    with pytest.raises(InputError, match=r"broken.fits.gz: corrupt gzipped FITS file"):
        formats.scan_fits(broken)
    assert formats.file_size(cut) == len(data) - 5000
    whole = tmp_path / "whole.fits.gz"
    whole.write_bytes(gzip.compress(data))
    assert formats.file_size(whole) == len(data) and len(formats.scan_fits(whole)) == 4


def test_archive_keywords_and_names(simulated_set):
    sim = simulated_set(archive=True, illum=True)
    headers = [fits.getheader(p) for p in sim.files["SKYFLAT"] + sim.files["ILLUM"]]
    assert [p.name for p in sim.files["SKYFLAT"]] == [f"MUSE.{h['DATE-OBS']}.fits" for h in headers[:3]]
    assert [h["ESO TPL START"] for h in headers] == [headers[0]["DATE-OBS"][:19]] * 3 + [headers[3]["DATE-OBS"][:19]]
    assert [(h["ESO TPL NEXP"], h["ESO TPL EXPNO"]) for h in headers] == [(3, 1), (3, 2), (3, 3), (1, 1)]
    assert [h["ESO DPR TYPE"] for h in headers] == ["FLAT,SKY"] * 3 + ["FLAT,LAMP,ILLUM"]
    assert all(h["ARCFILE"] == f"MUSE.{h['DATE-OBS']}.fits" for h in headers)
    default = fits.getheader(simulated_set(illum=True).files["SKYFLAT"][0])
    assert "ESO TPL START" not in default and "ARCFILE" not in default
    with fits.open(sim.files["SKYFLAT"][0]) as a, fits.open(simulated_set(illum=True).files["SKYFLAT"][0]) as b:
        assert np.array_equal(a[1].data, b[1].data)


def test_default_workers_follow_omp_num_threads_and_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert threads.default_workers({}) == 3
    assert threads.default_workers({"OMP_NUM_THREADS": "2"}) == 2
    assert threads.default_workers({"OMP_NUM_THREADS": "4,2"}) == 4
    assert threads.default_workers({"OMP_NUM_THREADS": "7"}) == 7  # may exceed the affinity, as libgomp
    assert threads.default_workers({"OMP_NUM_THREADS": "0"}) == 3
    assert threads.default_workers({"OMP_NUM_THREADS": "lots"}) == 3
    assert threads.default_workers({"OMP_NUM_THREADS": "100"}) == 24
    assert recipe.RunOptions.resolve({"OMP_NUM_THREADS": "2"}).workers == 2
    assert recipe.RunOptions.resolve({}).workers == 3
    assert recipe.RunOptions.resolve({"OMP_NUM_THREADS": "2"}, workers=5).workers == 5
