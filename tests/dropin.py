"""Helpers of the drop-in tests: musetwilight-esorex linked as ``esorex`` on a PATH, the real
esorex's own run of the same command line, and the comparisons of products, products SOF
files and log files (parity tolerances: DATACUBE_SKYFLAT bit-identical, TWILIGHT_CUBE within
1e-6 relative, as tests/test_reference_products.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import musetwilight
from musetwilight.tools.compare import Tolerances, compare_products

SRC = Path(musetwilight.__file__).resolve().parents[1]
REAL_ESOREX = "/usr/bin/esorex"
TWILIGHT_RTOL = 1e-6
PRODUCTS = ("DATACUBE_SKYFLAT.fits", "TWILIGHT_CUBE.fits")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \[(?: INFO  |WARNING| ERROR | DEBUG )\] [^:\s]*: \[tid=\d{3}\] ")
LOG_HEAD = re.compile(r"^\nStart time     : \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\nProgram name   : esorex\n"
                      r"Severity level : \[(?: INFO  |WARNING| ERROR | DEBUG )\] \n\n")


def dropin_bin(directory: Path) -> Path:
    """A folder with the console script ``musetwilight-esorex`` (this checkout's package, found
    without PYTHONPATH, as an installed script would be) and ``esorex`` linked to it."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "musetwilight-esorex"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(SRC)!r})\n"
                      "from musetwilight.shells.esorex import entry_point\nentry_point()\n")
    script.chmod(0o755)
    link = directory / "esorex"
    if not link.is_symlink():
        link.symlink_to("musetwilight-esorex")
    return directory


def eso_bin(directory: Path) -> Path:
    """A folder with ``esorex`` linked to ESO's, for the reference run of a client."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "esorex"
    if not link.is_symlink():
        link.symlink_to(REAL_ESOREX)
    return directory


def env_with_path(bin_dir: Path, **extra: str) -> dict[str, str]:
    """The test's environment with ``bin_dir`` first on PATH (and PYTHONPATH of this checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESOREX_", "OMP_", "MUSETWILIGHT_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def shell(command: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """A client's command line, through ``/bin/sh`` as ``os.system`` and ``shell=True`` run it."""
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Parity:
    """How our products compare with ESO's: largest absolute difference of DATACUBE_SKYFLAT
    (must be 0, NaNs at the same places) and largest relative difference of TWILIGHT_CUBE."""

    skyflat_max_abs: float
    skyflat_nan_mismatch: int
    twilight_max_rel: float

    @property
    def ok(self) -> bool:
        return self.skyflat_max_abs == 0 and self.skyflat_nan_mismatch == 0 and self.twilight_max_rel <= TWILIGHT_RTOL


def parity(eso: Path, ours: Path, names: dict[str, str] | None = None) -> Parity:
    """Compare product files (``names`` maps DATACUBE_SKYFLAT.fits / TWILIGHT_CUBE.fits to the
    names a client gave them) in two folders, with the project's comparator."""
    names = names or {p: p for p in PRODUCTS}
    sky = compare_products(eso / names[PRODUCTS[0]], ours / names[PRODUCTS[0]], Tolerances(rtol_max=0.0))
    twi = compare_products(eso / names[PRODUCTS[1]], ours / names[PRODUCTS[1]], Tolerances(rtol_max=TWILIGHT_RTOL))
    sky_diffs = [d for f in sky.files for d in f.images]
    twi_diffs = [d for f in twi.files for d in f.images]
    assert [d.extension for d in sky_diffs] == ["DATA", "STAT", "white"], sky.format()
    assert twi_diffs and not twi.missing_in_test, twi.format()
    return Parity(max(d.max_abs for d in sky_diffs), sum(d.nan_mismatch for d in sky_diffs),
                  max(d.max_rel for d in twi_diffs))


def log_structure(path: Path) -> tuple[list[str], list[str]]:
    """A log file in EsoRex's layout: (the invocation argv, the lines after the recipe ran);
    asserts the header block and that every line has EsoRex's format."""
    text = path.read_text()
    assert LOG_HEAD.match(text), text[:300]
    lines = text[LOG_HEAD.match(text).end():].splitlines()
    stamped = [line for line in lines if line]
    bad = [line for line in stamped if not LOG_LINE.match(line) and not line.startswith("If you want")]
    assert not bad, bad[:5]
    invocation = next(line for line in stamped if "Invocation command line was: " in line)
    argv = invocation.split("Invocation command line was: ", 1)[1].split()
    return argv, [LOG_LINE.sub("", line) for line in stamped]


def assert_same_log_structure(eso: Path, ours: Path, eso_root: Path, our_root: Path) -> None:
    """Same invocation, same product lines and ESO's layout in both log files (paths under
    ``eso_root`` read as under ``our_root``)."""
    eso_argv, eso_lines = log_structure(eso)
    our_argv, our_lines = log_structure(ours)
    assert our_argv == [a.replace(str(eso_root), str(our_root)) for a in eso_argv]
    for wanted in ("2 products created", "Calculating product checksums"):
        assert (wanted in eso_lines) == (wanted in our_lines), wanted
    assert [x.replace(str(eso_root), str(our_root)) for x in eso_lines if x.startswith("Created product")] == \
           [x for x in our_lines if x.startswith("Created product")] != []


def same_products_sof(eso: Path, ours: Path, eso_root: Path, our_root: Path) -> bool:
    """Whether two products SOF files are byte for byte the same, paths under the roots aside."""
    text = eso.read_text()
    return text.replace(str(eso_root), str(our_root)).replace(str(eso_root).replace("/", "\\/"),
                                                             str(our_root).replace("/", "\\/")) == ours.read_text()
