"""Benchmark: basic processing + combination of one full-size IFU, ours vs ESO.

Builds three synthetic full-size raw exposures of one IFU (4224 x 4240 uint16)
and full-size MASTER_BIAS/DARK/FLAT and a BADPIX_TABLE, then runs

* ESO: ``esorex muse_dark`` (the same muse_basicproc chain and
  muse_combine_images; --hotsigma=0 --normalize=-1 --scale=false),
* ours: process_exposures (3 exposures, calibrations loaded step by step as
  ESO does), combine_exposures, the twilight QC and interpolate_bad_pixels
  (saving the master for the parity check is not timed), in a fresh Python process (numba kernels warmed up first
  on tiny data, so compilation is not timed),

and prints wall time and peak memory (max RSS) of both and their ratios.

Usage: python benchmarks/bench_basicproc.py [--workdir DIR] [--combine sigclip]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from musetwilight.tools import eso

NX, NY, PRE, OVS = 2048, 2056, 32, 32


def _hdr(values: dict) -> fits.Header:
    header = fits.Header()
    for key, value in values.items():
        header[("HIERARCH " + key) if key.startswith("ESO ") else key] = value
    return header


def _det(gains=(1.1, 1.15, 1.05, 1.2)) -> dict:
    h = {"EXTNAME": "CHAN01", "ESO DET BINX": 1, "ESO DET BINY": 1, "ESO DET READ CURID": 1,
         "ESO DET READ CURNAME": "SCI1RO", "ESO DET CHIP NAME": "Synth", "ESO DET CHIP ID": "S01"}
    ports = [(1, 1), (4096, 1), (4096, 4112), (1, 4112)]
    for q in range(4):
        p = f"ESO DET OUT{q + 1} "
        h.update({p + "X": ports[q][0], p + "Y": ports[q][1], p + "NX": NX, p + "NY": NY,
                  p + "PRSCX": PRE, p + "PRSCY": PRE, p + "OVSCX": OVS, p + "OVSCY": OVS,
                  p + "GAIN": gains[q], p + "RON": 3.0})
    return h


def _muse_image(path: Path, catg: str, data, dq, stat, extra: dict, bunit: str) -> None:
    h = {"EXTNAME": "CHAN01", "ESO PRO CATG": catg, "PIPEFILE": path.name, "ESO DET BINX": 1,
         "ESO DET BINY": 1, "ESO DET READ CURID": 1, "ESO DET CHIP NAME": "Synth",
         "ESO DET CHIP ID": "S01", "ESO INS MODE": "WFM-NOAO-N", **extra}
    dh = fits.Header()
    dh["BUNIT"] = bunit
    fits.HDUList([fits.PrimaryHDU(header=_hdr(h)), fits.ImageHDU(data.astype(np.float32), dh, name="DATA"),
                  fits.ImageHDU(dq.astype(np.int32), name="DQ"),
                  fits.ImageHDU(stat.astype(np.float32), name="STAT")]).writeto(path, overwrite=True)


def make_data(workdir: Path, nexp: int = 3) -> dict:
    rng = np.random.default_rng(0)
    H, W = 2 * (PRE + NY + OVS), 2 * (PRE + NX + OVS)
    raws = []
    cols = np.cos(np.arange(W) / 37.0) ** 2
    for k in range(nexp):
        exptime = 10.0 + 2 * k
        data = rng.normal(1000.0, 3.0, (H, W)).astype(np.float32)
        data += np.linspace(0, 10, H, dtype=np.float32)[:, None]
        for y0 in (PRE, PRE + NY + 2 * OVS):  # illuminate the four data sections only
            for x0 in (PRE, PRE + NX + 2 * OVS):
                data[y0:y0 + NY, x0:x0 + NX] += (
                    1500.0 * exptime * (0.6 + 0.4 * cols[None, x0:x0 + NX])).astype(np.float32)
        hits = rng.integers(0, H * W, 2000)
        data.ravel()[hits] += 3000.0
        raw = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
        path = workdir / f"raw{k + 1}.fits"
        primary = fits.PrimaryHDU(header=_hdr({"EXPTIME": exptime, "ESO INS MODE": "WFM-NOAO-N",
                                               "ESO DET BINX": 1, "ESO DET BINY": 1,
                                               "ESO DET READ CURID": 1,
                                               "DATE-OBS": f"2026-01-01T18:0{k}:00.000"}))
        fits.HDUList([primary, fits.ImageHDU(raw, _hdr(_det()), name="CHAN01")]).writeto(path, overwrite=True)
        raws.append(path)
    shape = (2 * NY, 2 * NX)
    zeros = np.zeros(shape, np.int32)
    ovsc = {f"ESO DRS MUSE OVSC{q} {k}": v for q in range(1, 5) for k, v in (("MEAN", 1003.0), ("STDEV", 3.0))}
    _muse_image(workdir / "MASTER_BIAS.fits", "MASTER_BIAS", rng.normal(0, 0.3, shape), zeros,
                np.full(shape, 0.05), ovsc, "adu")
    _muse_image(workdir / "MASTER_DARK.fits", "MASTER_DARK", rng.normal(2, 0.5, shape), zeros,
                np.full(shape, 0.3), {"EXPTIME": 3600.0}, "count")
    _muse_image(workdir / "MASTER_FLAT.fits", "MASTER_FLAT", 1 + 0.05 * rng.normal(size=shape), zeros,
                np.full(shape, 1e-4), {"ESO QC FLAT MASTER INTFLUX": 1.0e6}, "")
    n = 5000
    bp = fits.BinTableHDU.from_columns([
        fits.Column("xpos", "J", array=rng.integers(1, W + 1, n)),
        fits.Column("ypos", "J", array=rng.integers(1, H + 1, n)),
        fits.Column("status", "J", array=np.full(n, 1 << 8)),
        fits.Column("value", "E", array=np.zeros(n, np.float32))], name="CHAN01")
    fits.HDUList([fits.PrimaryHDU(), bp]).writeto(workdir / "BADPIX_TABLE.fits", overwrite=True)
    return {"raws": [str(p) for p in raws], "dir": str(workdir)}


OURS = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from astropy.io import fits
from musetwilight.core import basicproc, combine
from musetwilight.core.images import MuseImage, RawImage
from musetwilight.core.overscan import dcr_flag
from musetwilight.params import make_settings

cfg = json.loads(sys.argv[1])
d = Path(cfg["dir"])

def image(path):
    with fits.open(path) as h:
        header = h[0].header.copy()
        for c in h["DATA"].header.cards:
            if c.keyword.startswith("ESO ") or c.keyword == "BUNIT":
                header[c.keyword] = c.value
        return MuseImage(h["DATA"].data.astype(np.float32), h["DQ"].data.astype(np.uint32),
                         h["STAT"].data.astype(np.float32), header)

def raw(path):
    with fits.open(path) as h:
        header = h[0].header.copy()
        for c in h["CHAN01"].header.cards:
            if c.keyword not in ("XTENSION", "BITPIX", "PCOUNT", "GCOUNT", "BZERO", "BSCALE") \
                    and not c.keyword.startswith("NAXIS"):
                header[c.keyword] = c.value
        return RawImage(h["CHAN01"].data, header, Path(path), 1)

# warm up the numba kernels on tiny data (compilation is not what we measure)
tiny = [MuseImage(np.ones((8, 8), np.float32), np.zeros((8, 8), np.uint32), np.ones((8, 8), np.float32),
                  fits.Header({"EXPTIME": 1.0})) for _ in range(3)]
for m in ("average", "median", "minmax", "sigclip"):
    combine.combine_exposures(tiny, make_settings({"combine": m}))
tiny[0].dq[2, 2] = 1
combine.interpolate_bad_pixels(tiny[0])
dcr_flag(np.ones((40, 40), np.float32), np.zeros((40, 40), np.uint32), 20, 20, 1, 2.5)

settings = make_settings({"combine": cfg["combine"]})
t0 = time.perf_counter()
with fits.open(d / "BADPIX_TABLE.fits") as h:
    badpix = h["CHAN01"].data
calibrations = basicproc.Calibrations(lambda: image(d / "MASTER_BIAS.fits"), lambda: image(d / "MASTER_FLAT.fits"),
                                      lambda: image(d / "MASTER_DARK.fits"), [badpix])
processed = basicproc.process_exposures([raw(p) for p in cfg["raws"]], settings, calibrations)
images = processed.images
master = combine.combine_exposures(images, settings)
qc = combine.exposure_qc(images, 1, processed.flat_zero)
del images
qc.update(combine.master_qc(master, 1))
wall = time.perf_counter() - t0
for name in ("data", "dq", "stat"):
    np.save(d / f"ours_{name}.npy", getattr(master, name))
t0 = time.perf_counter()
combine.interpolate_bad_pixels(master, in_place=True)
wall += time.perf_counter() - t0
print(json.dumps({"wall": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--combine", default="sigclip", choices=("average", "median", "minmax", "sigclip"))
    args = parser.parse_args()
    if eso.esorex_path() is None:
        print("esorex not installed: nothing to compare with")
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_basicproc_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = make_data(workdir)
    cfg["combine"] = args.combine

    sof = workdir / "dark.sof"
    sof.write_text("".join(f"{p} DARK\n" for p in cfg["raws"]) + "".join(
        f"{workdir / name}.fits {name}\n" for name in ("MASTER_BIAS", "MASTER_DARK", "MASTER_FLAT", "BADPIX_TABLE")))
    run = eso.run_esorex("muse_dark", sof, workdir / "eso", {
        "nifu": 1, "combine": args.combine, "hotsigma": 0, "normalize": -1, "scale": False})
    if run.returncode != 0:
        print("ESO failed:", run.errors)
        return 1

    ours = subprocess.run([sys.executable, "-c", OURS, json.dumps(cfg)], capture_output=True, text=True)
    if ours.returncode != 0:
        print(ours.stderr)
        return 1
    result = json.loads(ours.stdout.strip().splitlines()[-1])
    print(f"one full-size IFU, {len(cfg['raws'])} exposures, combine={args.combine}")
    print(f"ESO muse_dark : {run.wall_time:8.2f} s  peak RSS {run.max_rss_kb / 1024:8.1f} MiB")
    print(f"ours          : {result['wall']:8.2f} s  peak RSS {result['maxrss_kb'] / 1024:8.1f} MiB")
    print(f"time ratio ours/ESO   : {result['wall'] / run.wall_time:.2f}")
    print(f"memory ratio ours/ESO : {result['maxrss_kb'] / run.max_rss_kb:.2f}")
    with fits.open(run.product("MASTER_DARK-01.fits")) as hdul:
        edata, edq, estat = (hdul[n].data for n in ("DATA", "DQ", "STAT"))
        odata, odq, ostat = (np.load(workdir / f"ours_{n}.npy") for n in ("data", "dq", "stat"))
        # muse_dark adds its own hot/dark-pixel bits on already flagged pixels (hotsigma=0)
        extra = edq.astype(np.uint32) & ~odq
        same_dq = bool(np.all((extra & ~np.uint32((1 << 8) | (1 << 13))) == 0) and np.all(odq[extra != 0] != 0))
        good = edq == 0
        def rel(a, b):
            return float(np.max(np.abs(a[good] - b[good].astype(np.float64)) / np.maximum(np.abs(b[good]), 1.0)))
        print(f"parity: DQ identical {same_dq}, max rel diff data {rel(odata, edata):.3g}, "
              f"stat {rel(ostat, estat):.3g} on {int(good.sum())} good pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
