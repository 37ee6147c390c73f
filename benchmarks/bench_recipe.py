"""Whole-recipe benchmark: ESO's esorex muse_twilight and musetwilight on the same set, same run.

Runs both sides ``--runs`` times, interleaved (ESO, ours, ESO, ours, ...), each from a warm page
cache (every input file read once just before the run), and prints for each side the min /
median / max of wall time, CPU time (user + system) and peak resident memory, the ratios
ours / ESO, our per-stage wall, CPU and peak memory, and the comparison of the products
(DATACUBE_SKYFLAT voxel by voxel, TWILIGHT_CUBE's largest relative difference).

    python benchmarks/bench_recipe.py --scale full --data /tmp/full_set --runs 3 --json full.json
    python benchmarks/bench_recipe.py --data /tmp/full4 --matrix        # every kernel / crtype, 1 run each

ESO's peak memory is /usr/bin/time's; ours is the largest per-stage peak musetwilight reports
(it resets the kernel's high-water mark at each stage, so /usr/bin/time would see only the last).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from musetwilight.tools import eso
from musetwilight.tools.simulate import simulate_dataset

MATRIX = [{"resample": kernel, "crtype": "median"}
          for kernel in ("nearest", "linear", "quadratic", "renka", "drizzle", "lanczos")]
MATRIX += [{"resample": "drizzle", "crtype": crtype} for crtype in ("iraf", "mean")]


def timed(command: list[str], cwd: Path) -> dict:
    """Run ``command`` under /usr/bin/time -v; return wall, cpu (s) and peak RSS (MiB)."""
    completed = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, capture_output=True, text=True)
    report = completed.stderr

    def field(name: str) -> str:
        found = re.search(rf"{re.escape(name)}: (.+)", report)
        if not found:
            raise RuntimeError(f"{command[0]} failed ({completed.returncode}):\n{report[-3000:]}")
        return found.group(1).strip()

    clock = [float(part) for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60 ** power for power, value in enumerate(reversed(clock)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    rss = int(field("Maximum resident set size (kbytes)")) / 1024
    return {"wall": wall, "cpu": cpu, "rss": rss, "returncode": completed.returncode}


def warm(sof: Path) -> None:
    """Read every input file once, so that both sides start from the same page cache."""
    for line in sof.read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            with open(words[0], "rb") as handle:
                while handle.read(1 << 24):
                    pass


def run_eso(sof: Path, out: Path, params: dict) -> dict:
    out.mkdir(parents=True)
    options = [f"--{k}={v}" for k, v in params.items()]
    result = timed(["esorex", f"--recipe-dir={eso.plugin_dir()}", f"--output-dir={out}", f"--log-dir={out}",
                    "muse_twilight", *options, str(sof)], out)
    # ESO 2.8.7 crashes after writing DATACUBE_SKYFLAT for lanczos with crtype iraf: time what it did
    result["crashed"] = result["returncode"] != 0
    return result


def run_ours(sof: Path, out: Path, params: dict) -> dict:
    out.mkdir(parents=True)
    options = [f"--{k}={v}" for k, v in params.items()]
    result = timed([sys.executable, "-m", "musetwilight", "-q", "run", f"--output-dir={out}",
                    "--timings-json", str(out / "timings.json"), *options, str(sof)], out)
    if result["returncode"] != 0:
        raise RuntimeError(f"musetwilight failed on {sof}")
    measured = json.loads((out / "timings.json").read_text())
    result["rss"] = measured["timings"]["peak_rss_mb"]
    result["stages"] = measured["stages"]
    return result


def compare(eso_out: Path, our_out: Path) -> dict:
    """DATACUBE_SKYFLAT voxels that differ (bit for bit) and TWILIGHT_CUBE's largest relative difference."""
    out: dict = {}
    with fits.open(eso_out / "DATACUBE_SKYFLAT.fits") as a, fits.open(our_out / "DATACUBE_SKYFLAT.fits") as b:
        differing = 0
        for name in ("DATA", "STAT", "white"):
            x, y = a[name].data, b[name].data
            same = (x == y) | (np.isnan(x) & np.isnan(y))
            differing += int(np.count_nonzero(~same))
        out["datacube_skyflat_differing_values"] = differing
        out["datacube_skyflat_shape"] = list(a["DATA"].data.shape)
    twilight = eso_out / "TWILIGHT_CUBE.fits"
    if twilight.exists():
        worst = 0.0
        with fits.open(twilight) as a, fits.open(our_out / "TWILIGHT_CUBE.fits") as b:
            for hdu in a[1:]:
                if hdu.data is None or hdu.name.endswith("_DQ"):
                    continue
                x, y = hdu.data.astype(np.float64), b[hdu.name].data.astype(np.float64)
                finite = np.isfinite(x) & np.isfinite(y)
                rel = np.abs(x[finite] - y[finite]) / np.maximum(np.abs(x[finite]), 1e-30)
                worst = max(worst, float(rel.max(initial=0.0)))
        out["twilight_cube_max_rel"] = worst
    return out


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "?"
    except OSError:
        return "?"


def benchmark(sof: Path, params: dict, runs: int, work: Path) -> dict:
    sides: dict[str, list[dict]] = {"eso": [], "ours": []}
    for number in range(runs):
        for side, runner in (("eso", run_eso), ("ours", run_ours)):
            warm(sof)
            sides[side].append(runner(sof, work / f"{side}{number}", params))
    summary: dict = {"params": params, "runs": runs}
    for side, results in sides.items():
        summary[side] = {key: spread([r[key] for r in results]) for key in ("wall", "cpu", "rss")}
    summary["eso"]["crashed"] = any(r["crashed"] for r in sides["eso"])
    summary["ratio"] = {key: summary["ours"][key]["median"] / summary["eso"][key]["median"]
                        for key in ("wall", "cpu", "rss")}
    summary["ratio_range"] = {key: [min(o[key] / e[key] for o, e in zip(sides["ours"], sides["eso"])),
                                    max(o[key] / e[key] for o, e in zip(sides["ours"], sides["eso"]))]
                              for key in ("wall", "cpu", "rss")}
    stages = sides["ours"][0]["stages"]
    summary["our_stages_median"] = {name: {key: statistics.median(r["stages"][name][key] for r in sides["ours"])
                                           for key in stages[name]} for name in stages}
    summary["products"] = compare(work / "eso0", work / "ours0")
    return summary


def report(summary: dict) -> str:
    lines = [f"parameters: {summary['params'] or 'defaults'}; {summary['runs']} run(s) per side, interleaved, "
             "warm page cache"]
    lines.append(f"{'':8} {'ESO min/median/max':>26} {'musetwilight min/median/max':>30} {'ratio (range)':>22}")
    for key, unit in (("wall", "s"), ("cpu", "s"), ("rss", "MiB")):
        e, o = summary["eso"][key], summary["ours"][key]
        low, high = summary["ratio_range"][key]
        lines.append(f"{key:8} {e['min']:8.1f}{e['median']:8.1f}{e['max']:8.1f} {unit:3}"
                     f"{o['min']:10.1f}{o['median']:8.1f}{o['max']:8.1f} {unit:3}"
                     f"{summary['ratio'][key]:8.3f} ({low:.3f}-{high:.3f})")
    if summary["eso"]["crashed"]:
        lines.append("(ESO crashed after writing DATACUBE_SKYFLAT: its time is up to the crash)")
    lines.append("our stages (median): " + "; ".join(
        f"{name} {v['wall_s']:.1f} s wall, {v['cpu_s']:.1f} s CPU, {v['peak_rss_mb']:.0f} MiB"
        for name, v in summary["our_stages_median"].items()))
    products = summary["products"]
    lines.append(f"products: DATACUBE_SKYFLAT {products['datacube_skyflat_differing_values']} differing values "
                 f"(DATA/STAT/white, cube {'x'.join(map(str, products['datacube_skyflat_shape']))}); "
                 f"TWILIGHT_CUBE max relative difference {products.get('twilight_cube_max_rel', float('nan')):.2e}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("mini", "full"), default="mini")
    parser.add_argument("--data", type=Path, help="existing or new directory of the simulated set")
    parser.add_argument("--ifus", help="comma-separated IFUs of a new simulated set (default: all)")
    parser.add_argument("--nexp", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="runs per side, interleaved [3]")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="recipe parameter")
    parser.add_argument("--matrix", action="store_true",
                        help="every kernel with crtype median, and drizzle with each crtype")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the product directories")
    args = parser.parse_args()
    if eso.esorex_path() is None:
        print("esorex is not installed: nothing to compare with", file=sys.stderr)
        return 1
    data = args.data or Path(tempfile.mkdtemp(prefix=f"bench_{args.scale}_"))
    sofs = sorted(data.glob("*.sof")) if data.exists() else []
    ifus = [int(v) for v in args.ifus.split(",")] if args.ifus else None
    sof = sofs[0] if sofs else simulate_dataset(data, scale=args.scale, seed=args.seed, nexp=args.nexp,
                                                ifus=ifus).sof
    params = dict(item.split("=", 1) for item in args.param)
    cases = [{**params, **combination} for combination in MATRIX] if args.matrix else [params]
    results = {"date": datetime.date.today().isoformat(), "commit": commit(), "sof": str(sof), "cases": []}
    for case in cases:
        work = Path(tempfile.mkdtemp(prefix="bench_run_"))
        summary = benchmark(sof, case, args.runs if not args.matrix else min(args.runs, 1), work)
        results["cases"].append(summary)
        print(report(summary), flush=True)
        print()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
