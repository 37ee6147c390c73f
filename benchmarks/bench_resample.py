"""Benchmark: cube resampling of a full-size merged pixel table, ours vs ESO.

ESO's reference is ``muse_scipost_make_cube`` on the same pixel table (it runs
the same ``muse_resampling_cube`` as muse_twilight, with muse_twilight's
settings: pixfrac 1, ld 1, pixel-unit grid).  ESO's time is taken from its log
(pixel grid + cosmic-ray rejection + resampling, without FITS I/O) and as the
whole esorex wall time; ours is the in-memory ``resample_cube`` call.

The table is MUSE-like: ``--ifus`` IFUs of 48 slices x ~80 CCD columns, each
column sampled every ~1.25 A over 5000..9000 A (one full-size IFU is ~12 M
rows).  With ``--sof`` the table is instead the merged pixel table our
pipeline builds from a (simulated) twilight set, and ESO's time is the
``muse_resampling_cube`` timing in the log of ``esorex muse_twilight`` on the
same set.  Usage::

    python benchmarks/bench_resample.py --ifus 2 --methods drizzle,nearest
    python -m musetwilight simulate --scale full --ifus 1,2 --out /tmp/full
    python benchmarks/bench_resample.py --sof /tmp/full/twilight.sof
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from musetwilight.core.resample import ResampleOptions, resample_cube
from musetwilight.params import CrType, Resample
from musetwilight.tools.eso import esorex_path, run_esorex


def muse_like_table(nifu: int, seed: int = 0, lmin: float = 5000.0, lmax: float = 9000.0,
                    columns_per_slice: int = 80) -> dict[str, np.ndarray]:
    """A merged pixel table with MUSE's layout: per IFU 4 stacks x 12 slices,
    each slice one geometry pixel high and ~75 pixels wide."""
    rng = np.random.default_rng(seed)
    nslices = nifu * 48
    slice_ifu = np.repeat(np.arange(nifu), 48)
    slice_stack = np.tile(np.repeat(np.arange(4), 12), nifu)
    slice_row = np.tile(np.tile(np.arange(12), 4), nifu)
    x0 = -150.0 + 75.0 * slice_stack + rng.uniform(-0.5, 0.5, nslices)
    y0 = 12.0 * slice_ifu + slice_row + rng.uniform(-0.1, 0.1, nslices)
    col = np.arange(columns_per_slice)
    xcol = (x0[:, None] + col[None, :] * (75.0 / columns_per_slice)).ravel()
    ycol = np.repeat(y0, columns_per_slice) + rng.normal(0, 0.02, xcol.size)
    nk = int((lmax - lmin) / 1.25)
    lcol = lmin - 1.0 + rng.uniform(0, 2.0, xcol.size)
    lam = (lcol[:, None] + 1.25 * np.arange(nk)[None, :]).astype(np.float32)
    keep = (lam >= lmin) & (lam <= lmax)
    x = np.broadcast_to(xcol[:, None], lam.shape)[keep].astype(np.float32)
    y = np.broadcast_to(ycol[:, None], lam.shape)[keep].astype(np.float32)
    lam = lam[keep]
    flux = (800.0 * (1 + 0.1 * np.sin(x / 30.0)) * (lam / 7000.0) ** -1.5).astype(np.float32)
    data = flux + rng.normal(0, 1, flux.size).astype(np.float32) * np.sqrt(flux)
    stat = flux + np.float32(9.0)
    dq = np.zeros(flux.size, np.uint32)
    dq[rng.choice(flux.size, flux.size // 1000, replace=False)] = 1 << 8
    cosmics = rng.choice(flux.size, flux.size // 5000, replace=False)
    data[cosmics] += rng.uniform(200, 20000, cosmics.size).astype(np.float32)
    return {"xpos": x, "ypos": y, "lambda": lam, "data": data, "stat": stat, "dq": dq,
            "origin": np.zeros(flux.size, np.uint32)}


def write_eso_pixtable(path: Path, table: dict[str, np.ndarray]) -> None:
    """Write the table as an ESO pixel table (one image extension per column)."""
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        header["HIERARCH ESO DRS MUSE PIXTABLE TYPE"] = "GEOFULL"
        header["OBJECT"] = "benchmark"
        for key, column in (("X", "xpos"), ("Y", "ypos"), ("LAMBDA", "lambda")):
            header[f"HIERARCH ESO DRS MUSE PIXTABLE LIMITS {key} LOW"] = float(table[column].min())
            header[f"HIERARCH ESO DRS MUSE PIXTABLE LIMITS {key} HIGH"] = float(table[column].max())
    units = {"xpos": "pix", "ypos": "pix", "lambda": "Angstrom", "data": "count",
             "stat": "count**2"}
    hdus = [fits.PrimaryHDU(header=header)]
    for name in ("xpos", "ypos", "lambda", "data", "dq", "stat", "origin"):
        column = table[name]
        if column.dtype == np.uint32:
            column = column.view(np.int32)
        hdu = fits.ImageHDU(column.reshape(-1, 1))
        hdu.header["EXTNAME"] = name
        if name in units:
            hdu.header["BUNIT"] = units[name]
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path, overwrite=True)


# ESO's own timing of muse_resampling_cube (pixel grid, CR rejection, resampling)
_TIMING = re.compile(r"resampling took ([0-9.]+)s \(wall-clock\)")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 20 ms."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ifus", type=int, default=2, help="number of full-size IFUs (default 2)")
    parser.add_argument("--methods", default="drizzle", help="comma-separated resample methods")
    parser.add_argument("--crtype", default="median")
    parser.add_argument("--crsigma", type=float, default=50.0)
    parser.add_argument("--dlambda", type=float, default=250.0)
    parser.add_argument("--workdir", default=None, help="where to write the ESO pixel table")
    parser.add_argument("--sof", default=None,
                        help="a twilight SOF: benchmark on our merged table of that set against "
                             "ESO's muse_twilight (drizzle with --crtype/--crsigma/--dlambda)")
    args = parser.parse_args(argv)
    if args.sof:
        return bench_twilight_set(args)

    table = muse_like_table(args.ifus)
    nrow = table["data"].size
    table_bytes = sum(column.nbytes for column in table.values())
    print(f"pixel table: {args.ifus} IFU(s), {nrow} rows ({table_bytes / 2**20:.0f} MiB)")
    # compile once outside the timing
    small = {k: v[:20000] for k, v in table.items()}
    for method in args.methods.split(","):
        resample_cube(small["xpos"], small["ypos"], small["lambda"], small["data"], small["stat"],
                      small["dq"], options=_options(method, args), dlambda=args.dlambda)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_resample_"))
    workdir.mkdir(parents=True, exist_ok=True)
    have_eso = esorex_path() is not None
    if have_eso:
        ptfile = workdir / "PIXTABLE_BENCH.fits"
        write_eso_pixtable(ptfile, table)
        (workdir / "bench.sof").write_text(f"{ptfile} PIXTABLE_OBJECT\n")

    print(f"{'method':>10} {'ours [s]':>9} {'extra mem/table':>15} {'ESO core [s]':>12} "
          f"{'ESO total [s]':>13} {'ESO/ours core':>13} {'ESO/ours total':>14}")
    eso_peak = 0
    for method in args.methods.split(","):
        with PeakRSS() as memory:
            start = time.perf_counter()
            cube = resample_cube(table["xpos"], table["ypos"], table["lambda"], table["data"],
                                 table["stat"], table["dq"], options=_options(method, args), dlambda=args.dlambda)
            ours = time.perf_counter() - start
        del cube
        core = total = float("nan")
        if have_eso:
            run = run_esorex("muse_scipost_make_cube", workdir / "bench.sof", workdir / method, {
                "resample": method, "pixfrac": "1", "ld": 1, "crtype": args.crtype,
                "crsigma": args.crsigma, "dlambda": args.dlambda, "lambdamin": 4000.0,
                "lambdamax": 10000.0, "filter": "none"})
            if run.returncode != 0:
                print(f"ESO failed for {method}: {run.errors[-3:]}", file=sys.stderr)
            total = run.wall_time
            resampling = _TIMING.search(run.log)
            if resampling:
                core = float(resampling.group(1))
        print(f"{method:>10} {ours:9.2f} {memory.extra / table_bytes:15.2f} {core:12.2f} {total:13.2f} "
              f"{core / ours:13.2f} {total / ours:14.2f}")
        if have_eso:
            eso_peak = max(eso_peak, run.max_rss_kb * 1024)
    if have_eso:
        print(f"ESO peak resident memory (largest run): {eso_peak / table_bytes:.2f} x the table")
    return 0


def merged_table_of(sof: str, settings) -> dict[str, np.ndarray]:
    """Our merged, flux-scaled pixel table of a twilight set (recipe stages 1-2)."""
    from musetwilight import recipe
    from musetwilight.core.fluxscale import flux_scales
    from musetwilight.instrument import is_nfm

    inputs = recipe.read_inputs(sof, settings)
    mode = recipe.instrument_mode(inputs.skyflats[0])
    reductions = recipe.reduce_ifus(inputs, settings, mode, recipe.RunOptions(workers=2))
    tables = {ifu: result.table for ifu, result in reductions.results.items()}
    flux = flux_scales(tables, nfm=is_nfm(mode))
    order = sorted(flux.divisor)
    columns = {}
    for name, key in (("xpos", "xpos"), ("ypos", "ypos"), ("lambda", "lambda_"), ("data", "data"),
                      ("stat", "stat"), ("dq", "dq")):
        parts = [getattr(tables[i], key) for i in order]
        if name in ("data", "stat"):
            power = 1 if name == "data" else 2
            parts = [(p / np.float64(flux.divisor[i]) ** power).astype(np.float32) for p, i in zip(parts, order)]
        columns[name] = np.concatenate(parts)
    return columns


def _options(method: str, args) -> ResampleOptions:
    return ResampleOptions(Resample(method), CrType(args.crtype), args.crsigma)


def bench_twilight_set(args) -> int:
    """Resampling of one twilight set: ours on our merged table vs the timing
    ESO's muse_twilight logs for the same stage on the same set."""
    from musetwilight.params import make_settings

    settings = make_settings({"resample": "drizzle", "crtype": args.crtype, "crsigma": args.crsigma,
                              "dlambda": args.dlambda})
    table = merged_table_of(args.sof, settings)
    table_bytes = sum(column.nbytes for column in table.values())
    print(f"merged pixel table of {args.sof}: {table['data'].size} rows ({table_bytes / 2**20:.0f} MiB)")
    small = {k: v[:20000] for k, v in table.items()}
    resample_cube(small["xpos"], small["ypos"], small["lambda"], small["data"], small["stat"],
                  small["dq"], options=_options("drizzle", args), dlambda=args.dlambda)
    with PeakRSS() as memory:
        start = time.perf_counter()
        resample_cube(table["xpos"], table["ypos"], table["lambda"], table["data"], table["stat"],
                      table["dq"], options=_options("drizzle", args), dlambda=args.dlambda)
        ours = time.perf_counter() - start
    core = float("nan")
    if esorex_path() is not None:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_resample_"))
        run = run_esorex("muse_twilight", args.sof, workdir / "twilight", {
            "resample": "drizzle", "crtype": args.crtype, "crsigma": args.crsigma,
            "dlambda": args.dlambda})
        resampling = _TIMING.search(run.log)
        if resampling:
            core = float(resampling.group(1))
    print(f"drizzle/{args.crtype}/{args.crsigma:g}: ours {ours:.2f} s (extra memory "
          f"{memory.extra / table_bytes:.2f} x table), ESO muse_resampling_cube {core:.2f} s, "
          f"ESO/ours {core / ours:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
