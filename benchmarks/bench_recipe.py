"""Whole-recipe benchmark: ESO's esorex muse_twilight and musetwilight on the same set, one run.

Prints wall time, CPU time (user + system) and peak RSS of both (from /usr/bin/time -v),
their ratios (ours / ESO), and where our time goes per stage.

    python benchmarks/bench_recipe.py --scale mini
    python benchmarks/bench_recipe.py --scale full --data /tmp/full_set     # 24 IFUs, 3 SKYFLATs
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from musetwilight.tools import eso
from musetwilight.tools.simulate import simulate_dataset


def timed(command: list[str], cwd: Path) -> dict:
    """Run ``command`` under /usr/bin/time -v; return wall, cpu (s) and peak RSS (MiB)."""
    completed = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    report = completed.stderr

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", report).group(1).strip()

    clock = [float(part) for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60 ** power for power, value in enumerate(reversed(clock)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    rss = int(field("Maximum resident set size (kbytes)")) / 1024
    return {"wall": wall, "cpu": cpu, "rss": rss, "stdout": completed.stdout, "stderr": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("mini", "full"), default="mini")
    parser.add_argument("--data", type=Path, help="existing or new directory of the simulated set")
    parser.add_argument("--nexp", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the product directories")
    args = parser.parse_args()
    if eso.esorex_path() is None:
        print("esorex is not installed: nothing to compare with", file=sys.stderr)
        return 1
    data = args.data or Path(tempfile.mkdtemp(prefix=f"bench_{args.scale}_"))
    sofs = list(data.glob("*.sof")) if data.exists() else []
    sof = sofs[0] if sofs else simulate_dataset(data, scale=args.scale, seed=args.seed, nexp=args.nexp).sof
    work = Path(tempfile.mkdtemp(prefix="bench_run_"))
    eso_out, our_out = work / "eso", work / "ours"
    eso_out.mkdir()
    our_out.mkdir()
    plugin = eso.plugin_dir()
    theirs = timed(["esorex", f"--recipe-dir={plugin}", f"--output-dir={eso_out}", f"--log-dir={eso_out}",
                    "muse_twilight", str(sof)], eso_out)
    ours = timed([sys.executable, "-m", "musetwilight", "-q", "run", f"--output-dir={our_out}",
                  "--timings-json", str(our_out / "timings.json"), str(sof)], our_out)
    stages = json.loads((our_out / "timings.json").read_text())
    print(f"set: {sof} ({args.scale})")
    print(f"{'':10} {'ESO':>12} {'musetwilight':>14} {'ratio':>8}")
    for key, unit in (("wall", "s"), ("cpu", "s"), ("rss", "MiB")):
        print(f"{key:10} {theirs[key]:10.1f} {unit:<3}{ours[key]:10.1f} {unit:<3} {ours[key] / theirs[key]:8.2f}")
    print("musetwilight stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
