"""How musetwilight's time and peak memory grow with the number of IFUs and of exposures.

Full-size simulated WFM sets: 1, 6 and 24 IFUs with 3 SKYFLATs, and 3, 6 and 12 SKYFLATs
with 6 IFUs. Prints wall time, CPU time and peak RSS (``/usr/bin/time -v``) per set, and each
value per IFU or per exposure relative to the smallest set (<= 1 means linear or better).

    python benchmarks/bench_scaling.py [--ifus 1,6,24] [--nexp 3,6,12] [--esorex]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench_recipe import run_ours, timed

from musetwilight.tools import eso
from musetwilight.tools.simulate import simulate_dataset


def measure(ifus: int, nexp: int, with_eso: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"scaling_{ifus}x{nexp}_"))
    try:
        sim = simulate_dataset(work / "set", scale="full", seed=1, nexp=nexp, ifus=list(range(1, ifus + 1)))
        row = {"ours": run_ours(sim.sof, work / "ours", {})}  # peak RSS: the largest of the per-stage peaks
        if with_eso:
            eso_out = work / "eso"
            eso_out.mkdir()
            row["eso"] = timed(["esorex", f"--recipe-dir={eso.plugin_dir()}", f"--output-dir={eso_out}",
                                f"--log-dir={eso_out}", "muse_twilight", str(sim.sof)], eso_out)
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(title: str, unit: str, points: list[tuple[int, dict]], program: str) -> str:
    lines = [f"{title} ({program})", f"{unit:>6} {'wall s':>9} {'CPU s':>9} {'RSS MiB':>9} "
             f"{'wall/' + unit:>10} {'RSS/' + unit:>10}"]
    base_n, base = points[0]
    for n, row in points:
        run = row[program]
        growth_wall = (run["wall"] / n) / (base[program]["wall"] / base_n)
        growth_rss = (run["rss"] / n) / (base[program]["rss"] / base_n)
        lines.append(f"{n:>6} {run['wall']:9.1f} {run['cpu']:9.1f} {run['rss']:9.0f} "
                     f"{growth_wall:10.2f} {growth_rss:10.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ifus", default="1,6,24", help="numbers of IFUs (3 SKYFLATs each)")
    parser.add_argument("--nexp", default="3,6,12", help="numbers of SKYFLATs (with 6 IFUs)")
    parser.add_argument("--esorex", action="store_true", help="also run ESO's esorex on every set")
    args = parser.parse_args()
    if args.esorex and eso.esorex_path() is None:
        print("esorex is not installed", file=sys.stderr)
        return 1
    programs = ["ours"] + (["eso"] if args.esorex else [])
    by_ifus = [(n, measure(n, 3, args.esorex)) for n in map(int, args.ifus.split(","))]
    by_nexp = [(n, measure(6, n, args.esorex)) for n in map(int, args.nexp.split(","))]
    for program in programs:
        print(table("scaling with the number of IFUs (3 SKYFLATs)", "IFUs", by_ifus, program))
        print()
        print(table("scaling with the number of SKYFLATs (6 IFUs)", "exp", by_nexp, program))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
