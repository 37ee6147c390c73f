"""Memory caps: musetwilight under each --max-memory against ESO's esorex muse_twilight, same set, same run.

For each cap (``none``: only the machine's memory) prints the plan the run chose (IFUs at once,
low-memory path, tile size), its estimated peak, the measured peak per stage and overall, the
ratio of that peak and of the wall time to ESO's, and whether the products are still ESO's
(DATACUBE_SKYFLAT voxel by voxel, TWILIGHT_CUBE's largest relative difference).  A cap too small
for the set must be refused at once: that case prints the refusal and how long it took.

    python benchmarks/bench_memory.py --data /tmp/full24 --caps none,2.4G,2G,1.7G,1.2G --json caps.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipe import commit, compare, run_eso, timed, warm  # noqa: E402

from musetwilight.tools import eso  # noqa: E402
from musetwilight.tools.simulate import simulate_dataset  # noqa: E402


def run_capped(sof: Path, out: Path, cap: str) -> dict:
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "musetwilight", "-q", "run", f"--output-dir={out}",
               "--timings-json", str(out / "timings.json"), str(sof)]
    if cap != "none":
        command.insert(-1, f"--max-memory={cap}")
    start = time.perf_counter()
    result = timed(command, out)
    if result["returncode"] != 0:
        done = subprocess.run(command, capture_output=True, text=True)  # the message of the refusal
        return {"cap": cap, "refused": done.stderr.strip().splitlines()[-1], "seconds": time.perf_counter() - start}
    measured = json.loads((out / "timings.json").read_text())
    return {"cap": cap, "wall": result["wall"], "cpu": result["cpu"], "rss": measured["timings"]["peak_rss_mb"],
            "stages": measured["stages"], "plan": measured["memory"]}


def report(eso_run: dict, ours: list[dict], comparisons: dict) -> str:
    lines = [f"ESO: wall {eso_run['wall']:.1f} s, peak {eso_run['rss']:.0f} MiB"]
    for run in ours:
        if "refused" in run:
            lines.append(f"cap {run['cap']:>6}: refused after {run['seconds']:.1f} s: {run['refused']}")
            continue
        plan = run["plan"]
        tile = f"tiles of {plan['rows_per_tile'] / 1e6:.3g} M rows" if plan["low_memory"] else "tables in memory"
        stages = ", ".join(f"{name} {v['peak_rss_mb']:.0f}" for name, v in run["stages"].items())
        products = comparisons[run["cap"]]
        lines.append(
            f"cap {run['cap']:>6}: {plan['workers']} IFU(s) at once, {tile}; estimated {plan['estimate_mb']:.0f} MiB, "
            f"measured {run['rss']:.0f} MiB (ratio to ESO {run['rss'] / eso_run['rss']:.3f}; stages MiB: {stages}); "
            f"wall {run['wall']:.1f} s (ratio {run['wall'] / eso_run['wall']:.3f}); DATACUBE_SKYFLAT "
            f"{products['datacube_skyflat_differing_values']} differing values, TWILIGHT_CUBE max rel "
            f"{products.get('twilight_cube_max_rel', float('nan')):.2e}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="existing or new directory of a full-size set")
    parser.add_argument("--caps", default="none,2.4G,2G,1.7G,1.2G", help="comma-separated --max-memory values")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    if eso.esorex_path() is None:
        print("esorex is not installed: nothing to compare with", file=sys.stderr)
        return 1
    sofs = sorted(args.data.glob("*.sof")) if args.data.exists() else []
    sof = sofs[0] if sofs else simulate_dataset(args.data, scale="full").sof
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        warm(sof)
        eso_run = run_eso(sof, work / "eso", {})
        ours, comparisons = [], {}
        for cap in args.caps.split(","):
            warm(sof)
            run = run_capped(sof, work / f"ours_{cap}", cap)
            ours.append(run)
            if "refused" not in run:
                comparisons[cap] = compare(work / "eso", work / f"ours_{cap}")
        print(report(eso_run, ours, comparisons))
        if args.json:
            args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "commit": commit(),
                                             "sof": str(sof), "eso": eso_run, "ours": ours,
                                             "products": comparisons}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
