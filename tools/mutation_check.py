"""The mutation check: plausible one-line bugs, applied one at a time, and the tests that catch them.

    python tools/mutation_check.py                 # every mutant: the suite without ESO, then with it
    python tools/mutation_check.py --only sigclip-upper drizzle-spectral
    python tools/mutation_check.py --list

For each mutant the source line is replaced (the file is restored afterwards, whatever happens),
then the test suite runs without ESO ($MUSETWILIGHT_ESOREX empty: every ESO comparison skipped),
stopping at the first failure; a mutant that survives runs again with ESO (the tests marked
``eso``).  The report says which test caught each mutant.  The goal (README, "Testing"): the suite
without ESO catches at least 18 of them, the full suite all.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "musetwilight"
# the tests that catch most bugs fastest first, then the rest of the suite
FAST_FIRST = ["test_definitions.py", "test_reference_products.py", "test_basicproc.py", "test_pixtable.py",
              "test_smooth.py", "test_resample.py", "test_combine.py", "test_fluxscale.py"]


def test_files() -> list[str]:
    """Every test module, the fast and sensitive ones first (pytest keeps this order)."""
    rest = sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if p.name not in FAST_FIRST)
    return [f"tests/{name}" for name in FAST_FIRST + rest]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the package
    original: str
    mutated: str
    what: str


MUTANTS = (
    Mutant("pixtable-lambda", "core/pixtable.py", "lam32 = np.float32(lval)", "lam32 = np.float32(lval + 1e-4)",
           "pixel-table wavelengths shifted by 1e-4 Angstrom"),
    Mutant("drizzle-spectral", "core/resample.py", "w = xterm * min(yterm, yin) * zterm / volume",
           "w = xterm * min(yterm, yin) / volume", "drizzle weight without its spectral term"),
    Mutant("median-window", "core/smooth.py", "PLANE_MEDIAN_HALF = (2, 3)", "PLANE_MEDIAN_HALF = (3, 2)",
           "7 x 5 instead of 5 x 7 plane median"),
    Mutant("sigclip-upper", "core/combine.py", "lo = med - lsigma * mdev\n    hi = med + hsigma * mdev",
           "lo = med - lsigma * mdev\n    hi = med + lsigma * mdev", "sigma clipping with lsigma as the upper bound"),
    Mutant("sigclip-upper-three", "core/combine.py",
           "lo = med - lsigma * mdev\n" + 20 * " " + "hi = med + hsigma * mdev",
           "lo = med - lsigma * mdev\n" + 20 * " " + "hi = med + lsigma * mdev",
           "the same in the sigma clipping of exactly three exposures"),
    Mutant("ovscignore-left", "core/detector.py", "vx = slice(L.prex + L.nx + ignore, L.prex + L.nx + L.ovx)",
           "vx = slice(L.prex + L.nx, L.prex + L.nx + L.ovx)",
           "vertical overscan of the left ports ignores ovscignore"),
    Mutant("gain-variance", "core/basicproc.py", "g2 = gain * gain", "g2 = gain",
           "variance converted to count with the gain instead of its square"),
    Mutant("flat-variance", "core/basicproc.py", "stat[r, c] = (stat[r, c] + term2 / f2) / f2",
           "stat[r, c] = (stat[r, c] + term2 / f2) / f", "flat-field variance divided by f instead of f**2"),
    Mutant("bias-variance", "core/basicproc.py", "v = np.float64(np.float32(data[r, c] - bias[r, c])) / gain",
           "v = np.float64(np.float32(data[r, c])) / gain", "photon variance from the data before the bias"),
    Mutant("nfm-ifu24", "core/fluxscale.py", "if nfm and ifu == 24:", "if nfm and ifu == 25:",
           "NFM: IFU 24 keeps its own flux"),
    Mutant("flux-ratio", "core/fluxscale.py", "scale = flux / flux_ref", "scale = flux_ref / flux",
           "flux scale inverted"),
    Mutant("white-float32", "core/cube.py", "total = np.where(good, cube_data, 0).sum(axis=0, dtype=np.float64)",
           "total = np.where(good, cube_data, 0).sum(axis=0, dtype=np.float32)",
           "white-light image summed in single precision"),
    Mutant("dark-variance", "core/basicproc.py", "np.float32(scale), np.float32(scale * scale))",
           "np.float32(scale), np.float32(scale))", "dark variance scaled linearly with the exposure time"),
    Mutant("saturation-limit", "core/basicproc.py", "bad = (data > np.float32(SATURATION_LIMIT))",
           "bad = (data > np.float32(SATURATION_LIMIT) + 100)", "saturation flagged 100 adu too high"),
    Mutant("dcr-gap", "core/overscan.py", "gapwidth = sigma * thres", "gapwidth = sigma",
           "DCR histogram gap without the threshold factor"),
    Mutant("vpoly-order", "core/overscan.py",
           "if norder == spec.order or (rms1 / rms2 < spec.frms and chisq1 / chisq2 < spec.fchisq):",
           "if norder == spec.order or (rms1 / rms2 < spec.frms or chisq1 / chisq2 < spec.fchisq):",
           "overscan polynomial order chosen when either statistic stops improving"),
    Mutant("illum-range", "core/illum.py", "ILLUM_LAMBDA_RANGE = (6500.0, 7500.0)",
           "ILLUM_LAMBDA_RANGE = (6500.0, 7000.0)", "ILLUM slice medians over 6500-7000 Angstrom"),
    Mutant("illum-normalisation", "core/illum.py", "return IllumCorrection(present, inverse / inverse.mean())",
           "return IllumCorrection(present, inverse / np.median(inverse))", "ILLUM factors normalised to their median"),
    Mutant("cr-threshold", "core/resample.py", "limit = level + sigma * dev", "limit = level + 0.5 * sigma * dev",
           "cosmic-ray threshold at half crsigma"),
    Mutant("cube-height", "core/cube.py", "ny = lround(abs(float(yhi) - float(ylo)) / 1.0) + 1",
           "ny = lround(abs(float(yhi) - float(ylo)) / 1.0) + 2", "cube one spaxel too tall"),
    Mutant("white-mask-dilation", "core/smooth.py", "for shift in range(1, 5):", "for shift in range(1, 3):",
           "white-light mask dilated by 3 instead of 5 columns"),
    Mutant("fit-last-row", "core/smooth.py", "use[-1, :] = False", "use[-1, :] = use[-1, :]",
           "the last row enters the per-plane polynomial fit"),
    Mutant("wfm-threshold", "core/smooth.py", "out[out < 1] = 1", "out[out < 0.99] = 1",
           "WFM vignetting model clipped at 0.99 instead of 1"),
    Mutant("slice-left-edge", "core/pixtable.py", "ileft = int(math.ceil(x1))", "ileft = int(math.floor(x1))",
           "slice's first pixel from floor instead of ceil of the left edge"),
)


def run_tests(env: dict[str, str], markers: str | None, timeout: float) -> tuple[bool, str]:
    """(failed, the first failing test) of one run of the suite, stopping at the first failure."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", "-rfE",
               *test_files()]
    if markers:
        command += ["-m", markers]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, "(timed out)"
    failed = done.returncode not in (0, 5)
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.M)
    first = match.group(1) if match else ""
    if failed and not first:
        lines = [line for line in done.stdout.splitlines() if "Error" in line or "failed" in line]
        first = lines[-1] if lines else done.stdout[-200:]
    return failed, first


def check(mutant: Mutant, timeout: float) -> dict:
    path = PACKAGE / mutant.file
    source = path.read_text()
    if source.count(mutant.original) != 1:
        return {"mutant": mutant.name, "error": f"{mutant.file}: the line to mutate is not there exactly once"}
    # a fresh Numba cache: a cached kernel does not notice that a function it calls has changed
    numba_cache = tempfile.mkdtemp(prefix="mutation-numba-")
    base_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "NUMBA_CACHE_DIR": numba_cache,
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = {"mutant": mutant.name, "what": mutant.what}
    start = time.perf_counter()
    try:
        path.write_text(source.replace(mutant.original, mutant.mutated))
        caught, by = run_tests({**base_env, "MUSETWILIGHT_ESOREX": "", "CI": "false"}, None, timeout)
        result["without_eso"] = by if caught else None
        if not caught:
            caught, by = run_tests(base_env, "eso", timeout)
        result["with_eso"] = by if caught else None
    finally:
        path.write_text(source)
        shutil.rmtree(numba_cache, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per test run")
    args = parser.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:22} {m.file:20} {m.what}")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    results = []
    for mutant in chosen:
        outcome = check(mutant, args.timeout)
        results.append(outcome)
        caught = outcome.get("without_eso") or outcome.get("with_eso")
        where = "without ESO" if outcome.get("without_eso") else ("with ESO" if caught else "NOT CAUGHT")
        print(f"{outcome['mutant']:22} {where:12} {caught or outcome.get('error', '')}  ({outcome.get('seconds')} s)",
              flush=True)
    without = sum(bool(r.get("without_eso")) for r in results)
    total = sum(bool(r.get("without_eso") or r.get("with_eso")) for r in results)
    print(f"\n{len(results)} mutants: {without} caught without ESO, {total} caught by the full suite")
    return 0 if total == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
