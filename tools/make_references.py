"""Regenerate the ESO reference products under tests/reference/ (needs ESO's pipeline installed).

    PYTHONPATH=src python tools/make_references.py              # every case (~15 s), rewrites tests/reference/
    PYTHONPATH=src python tools/make_references.py --only nfm   # some cases; the others stay as they are
    PYTHONPATH=src python tools/make_references.py --list       # the cases

Run it from the repository root, with the package importable (PYTHONPATH=src or an install),
whenever the simulator's output changes (tests/test_reference_products.py then fails with
"the simulator's output changed") or to move to another ESO version.  It needs
``esorex`` and the MUSE plugins ``muse-2.8.7`` (Debian: ``apt-get install esorex
cpl-plugin-muse``).  Only the simulator (``musetwilight.simulate``) of the package is used;
everything stored comes from ESO:

* per case, a mini set is simulated with fixed options and seed, reduced by ``esorex
  muse_twilight`` with the case's parameters, and ESO's DATACUBE_SKYFLAT.fits and
  TWILIGHT_CUBE.fits are stored as ESO wrote them, gzipped (``tests/reference/<case>/*.fits.gz``,
  astropy reads them as they are; the NFM cube would be 1.6 MB uncompressed);
* for the case's IFUs, ``esorex muse_scibasic`` (SKYFLAT retagged OBJECT, ``--nifu=N
  --saveimage=true --skylines= --crop=false`` and muse_twilight's overscan and combination
  parameters, ``--scale`` included, whose muse_scibasic default differs) gives ESO's combined
  CCD image (OBJECT_RED) and its pixel table (PIXTABLE_OBJECT); of these only SHA-256 digests
  of each extension / column (canonical form: tests/reference_digests.py) and a few summary
  numbers are kept.  A set with an ILLUM exposure also gets the ILLUM exposure alone through
  muse_scibasic (muse_scibasic would combine it with the SKYFLATs);
* ``tests/reference/manifest.json`` records, per case, the simulate options, the recipe
  parameters, the exact esorex command lines and SOFs (run in the simulated set's folder),
  the SHA-256 of every stored file, the digest of the simulated input data, and the ESO
  versions.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT / "tests" / "reference"
MANIFEST = REFERENCE_DIR / "manifest.json"
REGENERATE = "PYTHONPATH=src python tools/make_references.py"
PLUGIN = "muse-2.8.7"
PRODUCTS = ("DATACUBE_SKYFLAT.fits", "TWILIGHT_CUBE.fits")
# muse_twilight parameters that muse_scibasic shares (overscan handling and exposure combination)
SHARED_WITH_SCIBASIC = ("overscan", "ovscreject", "ovscsigma", "ovscignore", "combine", "nlow", "nhigh",
                        "nkeep", "lsigma", "hsigma", "scale")
PIXTABLE_COLUMNS = ("xpos", "ypos", "lambda", "data", "dq", "stat", "origin")
IMAGE_EXTENSIONS = ("DATA", "DQ", "STAT")
NOT_SIMULATED = re.compile(r"Calibrations could not be loaded for IFU\s+\d+: TRACE_TABLE WAVECAL_TABLE$")

sys.path.insert(0, str(ROOT / "tests"))
import reference_digests as rd  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    simulate: dict
    params: dict
    intermediate_ifus: tuple[int, ...] = ()
    sigclip_checks: bool = False  # verify with ESO that both clipping bounds matter
    catches: tuple[str, ...] = field(default=())


CASES = [
    Case("default", "default WFM-NOAO-N mini set, default parameters (drizzle, crtype median, sigclip 3/3)",
         {}, {}, (1, 2, 3), catches=("everything on the default path",)),
    Case("illum", "with an ILLUM exposure (per-slice ILLUM correction)", {"illum": True}, {}, (1,),
         catches=("ILLUM correction",)),
    Case("nfm", "NFM-AO-N: NaD notch 5780-6050, NFM vignetting model, IFU 24 takes IFU 23's flux",
         {"mode": "NFM-AO-N"}, {}, (1, 23, 24), catches=("NFM", "NaD notch", "vignetting fit")),
    Case("wfm-ao", "WFM-AO-N: NaD notch 5805-5966", {"mode": "WFM-AO-N"}, {}, (1,), catches=("NaD notch",)),
    Case("vignetting", "WFM VIGNETTING_MASK, vignsmooth=gaussian, vignxpar=8, vignmaskedges=0.05, "
         "xorder=3, yorder=1", {"vignetting": True},
         {"vignsmooth": "gaussian", "vignxpar": 8, "vignmaskedges": 0.05, "xorder": 3, "yorder": 1}, (1,),
         catches=("vignetting mask", "smoothing", "polynomial orders")),
    Case("sigclip5", "5 exposures, sigclip with lsigma 1.5 != hsigma 2.5 (rejections in both directions)",
         {"nexp": 5, "seed": 4}, {"combine": "sigclip", "lsigma": 1.5, "hsigma": 2.5}, (1, 2, 3),
         sigclip_checks=True, catches=("sigma clipping bounds",)),
    Case("nearest", "resample=nearest (seed 1)", {"seed": 1}, {"resample": "nearest"}, (1,),
         catches=("nearest kernel",)),
    Case("lanczos-mean", "resample=lanczos with crtype=mean (seed 1; ESO rejects ~2/3 of the voxels)",
         {"seed": 1}, {"resample": "lanczos", "crtype": "mean"}, (), catches=("lanczos kernel", "crtype mean")),
    Case("renka-iraf", "resample=renka with crtype=iraf (seed 1)", {"seed": 1},
         {"resample": "renka", "crtype": "iraf"}, (), catches=("renka kernel", "crtype iraf")),
    Case("calib-median", "MASTER_DARK, BADPIX_TABLE, saturated pixels, WFM-AO-E, 4 exposures combined by "
         "median (even count)", {"dark": True, "badpix": True, "saturate": True, "mode": "WFM-AO-E",
                                 "nexp": 4, "seed": 5},
         {"combine": "median"}, (1, 3), catches=("dark", "bad pixels", "saturation", "median")),
    Case("offset-average", "overscan=offset, ovscreject=fit, combine=average with scale, lambda 5500-8500 "
         "in 125 A steps", {"seed": 2},
         {"overscan": "offset", "ovscreject": "fit", "combine": "average", "scale": True,
          "lambdamin": 5500.0, "lambdamax": 8500.0, "dlambda": 125.0}, (1,),
         catches=("offset overscan", "fit rejection", "average", "scale", "wavelength range")),
]


# --------------------------------------------------------------------------------------------
# ESO


def plugin_dir() -> Path:
    found = sorted(glob.glob(f"/usr/lib/*/cpl/plugins/{PLUGIN}"))
    if not found:
        raise SystemExit(f"ESO's MUSE plugins {PLUGIN} are not installed (apt-get install esorex cpl-plugin-muse)")
    return Path(found[0])


def eso_versions(esorex: str, plugins: Path) -> dict:
    version = subprocess.run([esorex, "--version"], capture_output=True, text=True).stdout
    line = next((l.strip(" *") for l in version.splitlines() if "version" in l.lower()), version.strip())
    out = {"esorex_version": line.strip(), "plugin_dir": str(plugins), "plugin": plugins.name}
    if shutil.which("dpkg-query"):
        query = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "esorex", "cpl-plugin-muse",
                                "libcplcore26"], capture_output=True, text=True).stdout
        out["debian_packages"] = dict(l.split(" ", 1) for l in query.splitlines() if " " in l)
    return out


def recipe_defaults(esorex: str, plugins: Path, recipe: str) -> dict:
    """The recipe's parameters and defaults as ESO lists them (esorex --create-config)."""
    with tempfile.TemporaryDirectory() as tmp:
        rc = Path(tmp) / f"{recipe}.rc"
        subprocess.run([esorex, f"--recipe-dir={plugins}", f"--create-config={rc}", recipe],
                       capture_output=True, text=True, check=True)
        values = {}
        for line in rc.read_text().splitlines():
            if line.startswith(f"muse.{recipe}."):
                key, value = line[len(f"muse.{recipe}."):].split("=", 1)
                values[key] = value
    return values


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class EsoCall:
    command: list[str]
    returncode: int
    log: str
    out: Path
    wall: float

    def warnings(self) -> list[str]:
        return [m[1] for m in re.finditer(r"\[WARNING\] (?:[\w]+: )?(?:\[tid=\d+\] )?(.*)", self.log)]

    def errors(self) -> list[str]:
        return [m[1] for m in re.finditer(r"\[ ERROR \] (?:[\w]+: )?(?:\[tid=\d+\] )?(.*)", self.log)]


def run_esorex(esorex: str, plugins: Path, recipe: str, params: dict, sof_name: str, cwd: Path,
               out_name: str) -> EsoCall:
    """esorex in ``cwd`` with relative SOF and output folder, so that the command line is stable."""
    command = [Path(esorex).name, "--log-level=debug", f"--log-dir={out_name}", "--log-file=esorex.log",
               f"--output-dir={out_name}", "--suppress-prefix=TRUE", f"--recipe-dir={plugins}", recipe]
    command += [f"--{key}={_value(value)}" for key, value in params.items()]
    command.append(sof_name)
    (cwd / out_name).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run([esorex, *command[1:]], cwd=cwd, capture_output=True, text=True)
    log_path = cwd / out_name / "esorex.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else done.stdout + done.stderr
    return EsoCall(command, done.returncode, log, cwd / out_name, time.perf_counter() - start)


def write_sof(set_dir: Path, name: str, entries: list[tuple[Path, str]], retag: dict) -> list[str]:
    """A SOF of file names relative to the set folder; ``retag`` renames tags (None drops)."""
    lines = []
    for path, tag in entries:
        tag = retag.get(tag, tag)
        if tag:
            lines.append(f"{path.name} {tag}")
    (set_dir / name).write_text("\n".join(lines) + "\n")
    return lines


# --------------------------------------------------------------------------------------------
# digests of ESO's intermediate products


def image_digests(path: Path) -> dict:
    from astropy.io import fits
    with fits.open(path) as hdul:
        return {ext: rd.array_digest(hdul[ext].data) for ext in IMAGE_EXTENSIONS}


def pixtable_digests(path: Path) -> dict:
    from astropy.io import fits
    with fits.open(path) as hdul:
        return {column: rd.array_digest(hdul[column].data) for column in PIXTABLE_COLUMNS}


def scibasic(esorex, plugins, set_dir: Path, entries, kind: str, ifu: int, shared: dict,
             extra: dict | None = None, tag: str = "") -> tuple[EsoCall, dict]:
    """One muse_scibasic run for one IFU: ``kind`` 'sky' (the SKYFLATs) or 'illum' (the ILLUM alone)."""
    retag = {"SKYFLAT": "OBJECT", "ILLUM": None} if kind == "sky" else {"SKYFLAT": None, "ILLUM": "OBJECT"}
    sof_name = f"scibasic_{kind}.sof"
    sof = write_sof(set_dir, sof_name, entries, retag)
    params = {"nifu": ifu, "saveimage": True, "skylines": "", "crop": False, **shared}
    if kind == "illum":
        params["combine"] = "none"  # one exposure
    params.update(extra or {})
    call = run_esorex(esorex, plugins, "muse_scibasic", params, sof_name, set_dir,
                      f"eso_scibasic_{kind}{tag}_{ifu:02d}")
    if call.returncode != 0:
        raise RuntimeError(f"muse_scibasic ({kind}, IFU {ifu}) failed ({call.returncode}): {call.errors()[-3:]}")
    record = {"kind": kind, "ifu": ifu, "params": {k: _value(v) for k, v in params.items()}, "sof": sof,
              "esorex_command": shlex.join(call.command), "returncode": call.returncode,
              "OBJECT_RED": image_digests(call.out / f"OBJECT_RED_0001-{ifu:02d}.fits"),
              "PIXTABLE_OBJECT": pixtable_digests(call.out / f"PIXTABLE_OBJECT_0001-{ifu:02d}.fits")}
    return call, record


def sigclip_checks(esorex, plugins, set_dir, entries, case: Case, shared: dict) -> dict:
    """With ESO alone: do both clipping bounds change the result, and would lsigma as the upper bound?"""
    lsigma, hsigma = float(shared["lsigma"]), float(shared["hsigma"])
    variants = {"upper_bound_lsigma": {"lsigma": lsigma, "hsigma": lsigma},
                "no_upper_rejection": {"lsigma": lsigma, "hsigma": 1e6},
                "no_lower_rejection": {"lsigma": 1e6, "hsigma": hsigma}}
    import numpy as np
    from astropy.io import fits
    out = {}
    for name, bounds in variants.items():
        counts = {}
        for ifu in case.intermediate_ifus:
            call, record = scibasic(esorex, plugins, set_dir, entries, "sky", ifu, shared, bounds, f"_{name}")
            theirs = fits.getdata(call.out / f"OBJECT_RED_0001-{ifu:02d}.fits", "DATA")
            ours = fits.getdata(set_dir / f"eso_scibasic_sky_{ifu:02d}" / f"OBJECT_RED_0001-{ifu:02d}.fits", "DATA")
            counts[str(ifu)] = int(np.count_nonzero(theirs != ours))
        out[name] = {"bounds": bounds, "pixels_differing_per_ifu": counts}
    # and the product: muse_twilight with lsigma as the upper bound too
    params = {**case.params, "hsigma": lsigma}
    call = run_esorex(esorex, plugins, "muse_twilight", params, "twilight.sof", set_dir, "eso_twilight_upper_lsigma")
    a = fits.getdata(call.out / "DATACUBE_SKYFLAT.fits", "DATA")
    b = fits.getdata(set_dir / "eso_twilight" / "DATACUBE_SKYFLAT.fits", "DATA")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    out["upper_bound_lsigma"]["datacube_voxels_differing"] = int(np.count_nonzero(~same))
    out["upper_bound_lsigma"]["esorex_command"] = shlex.join(call.command)
    bad = [f"{name} IFU {ifu}" for name, v in out.items() for ifu, n in v["pixels_differing_per_ifu"].items() if n == 0]
    if bad or out["upper_bound_lsigma"]["datacube_voxels_differing"] == 0:
        raise RuntimeError(f"case {case.name}: a clipping bound makes no difference in ESO's results: {bad}")
    return out


def store_gzipped(source: Path, target: Path) -> dict:
    """ESO's file byte for byte inside a reproducible gzip (no name, mtime 0); both digests."""
    with open(target, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                  compresslevel=9) as packed:
        packed.write(source.read_bytes())
    return stored_record(target)


def stored_record(path: Path) -> dict:
    content = gzip.decompress(path.read_bytes())
    return {"sha256": rd.file_sha256(path), "bytes": path.stat().st_size,
            "content_sha256": hashlib.sha256(content).hexdigest(), "content_bytes": len(content)}


def _essence(content: bytes) -> list:
    """A FITS file's header cards and data, without what changes from run to run (DATE, checksums)."""
    import io

    from astropy.io import fits
    out = []
    with fits.open(io.BytesIO(content)) as hdul:
        for hdu in hdul:
            cards = [(c.keyword, str(c.value)) for c in hdu.header.cards
                     if c.keyword not in ("DATE", "CHECKSUM", "DATASUM")]
            out.append((cards, None if hdu.data is None else np.ascontiguousarray(hdu.data).tobytes()))
    return out


# --------------------------------------------------------------------------------------------


def make_case(case: Case, esorex: str, plugins: Path, twilight_defaults: dict, work: Path) -> dict:
    from musetwilight.tools.simulate import simulate_dataset

    start = time.perf_counter()
    set_dir = work / case.name
    sim = simulate_dataset(set_dir, **case.simulate)
    entries = rd.read_sof(sim.sof)
    sof = write_sof(set_dir, "twilight.sof", entries, {})  # relative names (the simulator's SOF is absolute)
    call = run_esorex(esorex, plugins, "muse_twilight", case.params, "twilight.sof", set_dir, "eso_twilight")
    if call.returncode != 0:
        raise RuntimeError(f"case {case.name}: esorex muse_twilight failed ({call.returncode}): {call.errors()[-3:]}")
    target = REFERENCE_DIR / case.name
    target.mkdir(parents=True, exist_ok=True)
    stored = {}
    for product in PRODUCTS:
        path = target / f"{product}.gz"
        unchanged = path.exists() and (_essence(gzip.decompress(path.read_bytes()))
                                       == _essence((call.out / product).read_bytes()))
        if unchanged:
            stored[path.name] = stored_record(path)  # same products, only ESO's DATE/CHECKSUM differ: keep
        else:
            stored[path.name] = store_gzipped(call.out / product, path)
    for stale in target.iterdir():
        if stale.name not in stored:
            stale.unlink()
    record = {
        "description": case.description,
        "catches": list(case.catches),
        "simulate": {"scale": "mini", **case.simulate},
        "params": case.params,
        "sof": sof,
        "esorex_command": shlex.join(call.command),
        "esorex_cwd": "the simulated set's folder",
        "eso_returncode": call.returncode,
        "eso_warnings": [w for w in call.warnings() if not NOT_SIMULATED.search(w)],
        "input_digest": rd.input_digest(sim.sof),
        "stored_files": stored,
        "intermediate": [],
    }
    effective = {**twilight_defaults, **{k: _value(v) for k, v in case.params.items()}}
    shared = {key: effective[key] for key in SHARED_WITH_SCIBASIC}
    has_illum = any(tag == "ILLUM" for _, tag in entries)
    for ifu in case.intermediate_ifus:
        for kind in ("sky", "illum") if has_illum else ("sky",):
            _, run = scibasic(esorex, plugins, set_dir, entries, kind, ifu, shared)
            record["intermediate"].append(run)
    if case.sigclip_checks:
        record["sigclip_checks"] = sigclip_checks(esorex, plugins, set_dir, entries, case, shared)
    print(f"{case.name}: done in {time.perf_counter() - start:.1f} s "
          f"({len(record['intermediate'])} muse_scibasic runs)", file=sys.stderr)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="CASE", help="regenerate only these cases")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--keep", type=Path, help="keep the simulated sets and ESO's outputs in this folder")
    args = parser.parse_args()
    if args.list:
        for case in CASES:
            print(f"{case.name:16s} {case.description}")
        return 0
    names = [c.name for c in CASES]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(names)}")
    esorex = shutil.which("esorex")
    if esorex is None:
        raise SystemExit("esorex is not installed (apt-get install esorex cpl-plugin-muse)")
    plugins = plugin_dir()
    manifest = json.loads(MANIFEST.read_text()) if args.only and MANIFEST.exists() else {}
    cases = manifest.get("cases", {})
    work = args.keep or Path(tempfile.mkdtemp(prefix="musetwilight-references-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        twilight_defaults = recipe_defaults(esorex, plugins, "muse_twilight")
        for case in CASES:
            if args.only and case.name not in args.only:
                continue
            cases[case.name] = make_case(case, esorex, plugins, twilight_defaults, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if not args.only:
        for stale in REFERENCE_DIR.iterdir():
            if stale.is_dir() and stale.name not in names:
                shutil.rmtree(stale)
    manifest = {
        "regenerate": REGENERATE,
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eso": eso_versions(esorex, plugins),
        "muse_twilight_defaults": twilight_defaults,
        "digests": "SHA-256 of canonical array bytes, see tests/reference_digests.py",
        "cases": {name: cases[name] for name in names if name in cases},
    }
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    total = sum(p.stat().st_size for p in REFERENCE_DIR.rglob("*") if p.is_file())
    print(f"wrote {MANIFEST.relative_to(ROOT)}; tests/reference holds {total / 1e6:.2f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
