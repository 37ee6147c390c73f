"""Time and memory of one IFU's pixel table: ours against ESO's, on the same data.

ESO: ``esorex muse_scibasic`` on a REDUCED image (no basic processing: it only
builds the pixel table, flags NaD in AO modes and saves it).  Its debug log
times ``muse_pixtable_create`` alone ("IFU n took ...s (wall-clock)").
Ours, in a fresh Python process: read the image and tables, ``build_pixtable``
(after a small warm-up call so that Numba's compilation is not counted), and
``write_pixtable``.

Usage: python benchmarks/bench_pixtable.py [--size full|mini] [--mode WFM-NOAO-N]
       [--workdir /tmp/bench_pixtable]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"full": (4096, 4112), "mini": (960, 700)}
IFU = 10

OURS = r"""
import time
T_START = time.perf_counter()
import json, logging, resource, sys
from pathlib import Path
import numpy as np
from astropy.io import fits
from musetwilight.io import formats as io
from musetwilight.core import pixtable as pt

logging.disable(logging.WARNING)
work, ifu, nx, repeat = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
header = fits.getheader(work / f"REDUCED-{ifu:02d}.fits")
header["BUNIT"] = "count"
trace = io.read_ifu_table(work / f"TRACE_TABLE-{ifu:02d}.fits", ifu)
wave = io.read_ifu_table(work / f"WAVECAL_TABLE-{ifu:02d}.fits", ifu)
geo = io.read_geometry_table(work / "GEOMETRY_TABLE.fits")
# warm-up (Numba compilation or cache load) on the first 40 rows
small = io.MuseImage(np.ones((40, nx), np.float32), np.zeros((40, nx), np.uint32),
                     np.ones((40, nx), np.float32), header)
pt.build_pixtable(small, trace, wave, geo)
del small
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
startup = t0 - T_START
image = io.read_muse_image(work / f"REDUCED-{ifu:02d}.fits")
trace = io.read_ifu_table(work / f"TRACE_TABLE-{ifu:02d}.fits", ifu)
wave = io.read_ifu_table(work / f"WAVECAL_TABLE-{ifu:02d}.fits", ifu)
geo = io.read_geometry_table(work / "GEOMETRY_TABLE.fits")
t1 = time.perf_counter()
table = pt.build_pixtable(image, trace, wave, geo)
t2 = time.perf_counter()
del image
pt.write_pixtable(work / "ours" / f"PIXTABLE_{ifu:02d}.fits", table)
t3 = time.perf_counter()
max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nrow, nbytes = table.nrow, table.nbytes
del table
# further builds for the minimum create time (the machine may be shared)
image = io.read_muse_image(work / f"REDUCED-{ifu:02d}.fits")
create = [t2 - t1]
for _ in range(repeat - 1):
    start = time.perf_counter()
    table = pt.build_pixtable(image, trace, wave, geo)
    create.append(time.perf_counter() - start)
    del table
print(json.dumps({"read": t1 - t0, "create": min(create), "write": t3 - t2, "total": t3 - t0,
                  "nrow": nrow, "table_bytes": nbytes, "base_rss_kb": base_rss, "startup": startup,
                  "max_rss_kb": max_rss}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--mode", default="WFM-NOAO-N")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_pixtable"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each side; the minimum times are reported")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from test_pixtable import write_reduced_set  # the synthetic MUSE-like data of the tests

    from musetwilight.tools.eso import esorex_path, run_esorex

    if esorex_path() is None:
        print("esorex not installed: no ESO reference, nothing to compare")
        return 1
    nx, ny = SIZES[args.size]
    work = args.workdir
    sof, _ = write_reduced_set(work, IFU, args.mode, nx, ny, seed=1)
    (work / "ours").mkdir(exist_ok=True)

    eso_runs, eso_creates = [], []
    for _ in range(args.repeat):
        run = run_esorex("muse_scibasic", sof, work / "eso",
                         {"nifu": IFU, "skylines": "", "crop": False, "saveimage": False,
                          "resample": False})
        if run.returncode != 0:
            print(f"esorex failed (exit {run.returncode})")
            return 1
        match = re.search(r"IFU\s+\d+ took ([0-9.eE+-]+)s \(CPU time\), "
                          r"([0-9.eE+-]+)s \(wall-clock\)", run.log)
        eso_creates.append(float(match.group(2)) if match else float("nan"))
        eso_runs.append(run)
    eso_wall = min(run.wall_time for run in eso_runs)
    eso_rss_kb = max(run.max_rss_kb for run in eso_runs)
    eso_create = min(eso_creates)

    results = []
    for _ in range(args.repeat):
        done = subprocess.run([sys.executable, "-c", OURS, str(work), str(IFU), str(nx),
                               str(args.repeat)], capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ours = {key: min(r[key] for r in results) for key in results[0]}
    ours["max_rss_kb"] = max(r["max_rss_kb"] for r in results)
    ours_wall = min(r["startup"] + r["total"] for r in results)

    print(f"pixel table of one IFU, {nx} x {ny} CCD, {args.mode}, {ours['nrow']} rows "
          f"({ours['table_bytes'] / 2**20:.0f} MiB of columns)")
    print(f"{'':28s}{'ESO':>10s}{'ours':>10s}{'ours/ESO':>10s}")
    rows = [("create only [s]", eso_create, ours["create"]),
            ("read+create+write [s]", eso_wall, ours["total"]),
            ("+ imports, JIT warm-up [s]", eso_wall, ours_wall),
            ("peak RSS [MiB]", eso_rss_kb / 1024, ours["max_rss_kb"] / 1024)]
    for label, theirs, mine in rows:
        print(f"{label:28s}{theirs:10.2f}{mine:10.2f}{mine / theirs:10.2f}")
    print(f"(minimum of {args.repeat} runs each; ours: read {ours['read']:.2f} s, write "
          f"{ours['write']:.2f} s; RSS after imports and warm-up "
          f"{ours['base_rss_kb'] / 1024:.0f} MiB;"
          f" ESO's create time is its own debug log's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
