"""Run the real ESO pipeline (EsoRex + the MUSE plugins) as a reference.

Used by the comparison tests and the benchmarks: the same inputs go through
ESO's recipe and through ours.  Nothing here is needed to reduce data.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..core.pixtable import COLUMN_UNITS, COLUMNS, SHIFT_IFU, SHIFT_X, SHIFT_Y, PixTable, as_uint32
from ..errors import InputError
from ..instrument import NUM_IFUS, NUM_SLICES

PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/cpl/plugins", "/usr/lib/aarch64-linux-gnu/cpl/plugins")

_LOG_LINE = re.compile(r"^\s*\d\d:\d\d:\d\d\s+\[\s*(?P<level>\w+)\s*\]\s+(?P<text>.*)$")


def esorex_path() -> str | None:
    """The esorex executable, or None where ESO's pipeline is not installed.

    ``$MUSETWILIGHT_ESOREX`` names another one; set to an empty string it hides ESO (to run
    the tests as on a machine without it, e.g. in the mutation check).
    """
    chosen = os.environ.get("MUSETWILIGHT_ESOREX")
    if chosen is not None:
        return shutil.which(chosen) if chosen else None
    return shutil.which("esorex")


def plugin_dir() -> str | None:
    for candidate in PLUGIN_DIRS:
        if os.path.isdir(candidate):
            return candidate
    return None


@dataclass
class EsoRun:
    """Outcome of one esorex call."""

    recipe: str
    returncode: int
    output_dir: Path
    log: str
    wall_time: float
    max_rss_kb: int
    messages: list[tuple[str, str]] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [text for level, text in self.messages if level == "WARNING"]

    @property
    def errors(self) -> list[str]:
        return [text for level, text in self.messages if level == "ERROR"]

    def product(self, name: str) -> Path:
        path = self.output_dir / name
        if not path.exists():
            raise FileNotFoundError(f"esorex {self.recipe} wrote no {name} (exit {self.returncode})")
        return path


def run_esorex(
    recipe: str,
    sof: str | os.PathLike,
    output_dir: str | os.PathLike,
    params: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> EsoRun:
    """Run ``esorex recipe --param=value ... sof`` writing into ``output_dir``."""
    exe = esorex_path()
    if exe is None:
        raise RuntimeError("esorex is not installed (apt-get install esorex cpl-plugin-muse)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "esorex.log"
    command = [exe, "--log-level=debug", f"--log-dir={out}", "--log-file=esorex.log",
               f"--output-dir={out}", "--suppress-prefix=TRUE"]
    directory = plugin_dir()
    if directory:
        command.append(f"--recipe-dir={directory}")
    command.append(recipe)
    for name, value in (params or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        command.append(f"--{name}={value}")
    command.append(str(Path(sof).resolve()))
    run_env = dict(os.environ)
    run_env.update(env or {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=out, env=run_env, capture_output=True, text=True,
                               timeout=timeout)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    log = log_file.read_text(errors="replace") if log_file.exists() else completed.stdout
    messages = []
    for line in log.splitlines():
        match = _LOG_LINE.match(line)
        if match:
            messages.append((match["level"].upper(), match["text"]))
    return EsoRun(recipe, completed.returncode, out, log + completed.stderr, wall,
                  max(rss, before), messages)


# --------------------------------------------------------------------------- pixel-table files
# To hand our pixel tables to ESO's recipes (muse_scipost_make_cube) and to read ESO's
# (PIXTABLE_OBJECT of muse_scibasic): ESO's layout and its origin bit field.


def encode_origin(x: np.ndarray, y: np.ndarray, ifu: np.ndarray, slice_: np.ndarray,
                  offset: np.ndarray) -> np.ndarray:
    """Pack 1-based CCD x, y, IFU, slice and the slice x offset into the origin bits."""
    x = np.asarray(x, dtype=np.int64)
    bits = ((x - np.asarray(offset, dtype=np.int64)) & 0xFF) << SHIFT_X
    bits |= np.asarray(y, dtype=np.int64) << SHIFT_Y
    bits |= np.asarray(ifu, dtype=np.int64) << SHIFT_IFU
    bits |= np.asarray(slice_, dtype=np.int64)
    return (bits & 0xFFFFFFFF).astype(np.uint32)


def slice_offsets(header: fits.Header, exp: int = 0) -> np.ndarray:
    """XOFFSET keywords as an int array ``[25, 49]`` indexed by [ifu, slice] (0 if absent)."""
    offsets = np.zeros((NUM_IFUS + 1, NUM_SLICES + 1), dtype=np.int64)
    pattern = re.compile(rf"^ESO DRS MUSE PIXTABLE EXP{exp} IFU(\d\d) SLICE(\d\d) XOFFSET$")
    for key in header.keys():
        match = pattern.match(key)
        if match:
            offsets[int(match.group(1)), int(match.group(2))] = int(header[key])
    return offsets


def decode_origin(origin: np.ndarray, header: fits.Header
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ifu, slice, x, y) of every row; x, y are 1-based trimmed-CCD pixels.

    x needs the per-slice ``XOFFSET`` keywords of ``header``.  (MPDAF's
    ``origin2xpix``/``origin2ypix`` return the same minus 1.)
    """
    origin = as_uint32(origin)
    slice_ = (origin & np.uint32(0x3F)).astype(np.int64)
    ifu = ((origin >> np.uint32(SHIFT_IFU)) & np.uint32(0x1F)).astype(np.int64)
    y = ((origin >> np.uint32(SHIFT_Y)) & np.uint32(0x1FFF)).astype(np.int64)
    x = ((origin >> np.uint32(SHIFT_X)) & np.uint32(0x7F)).astype(np.int64)
    x += slice_offsets(header)[ifu, slice_]
    return ifu, slice_, x, y


def write_pixtable(path: str | Path, table: PixTable, overwrite: bool = True) -> Path:
    """Write ESO's layout: header in the primary HDU, one image extension per column.

    Each column is an ``nrow x 1`` image (``NAXIS1 = 1``) named by EXTNAME, with
    BUNIT where ESO sets one; dq and origin are stored as int32 (same bits).
    """
    path = Path(path)
    hdus = [fits.PrimaryHDU(header=table.header.copy())]
    for name in COLUMNS:
        values = table.column(name)
        if values.dtype == np.uint32:
            values = values.view(np.int32)
        ext = fits.ImageHDU(values.reshape(-1, 1), name=name)
        if name in COLUMN_UNITS:
            ext.header["BUNIT"] = COLUMN_UNITS[name]
        hdus.append(ext)
    with warnings.catch_warnings():
        # the XOFFSET comments do not fit into 80 characters; FITS truncates them, as CPL
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        fits.HDUList(hdus).writeto(path, overwrite=overwrite)
    return path


def read_pixtable(path: str | Path) -> PixTable:
    """Read a pixel table written by ESO or by write_pixtable (image or table layout)."""
    path = Path(path)
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header.copy()
        names = {hdu.name.lower(): hdu for hdu in hdul[1:]}
        columns = {}
        if "xpos" in names:
            for name in COLUMNS:
                if name not in names:
                    raise InputError(f"{path}: pixel table has no {name} extension")
                columns[name] = np.asarray(names[name].data).reshape(-1)
        else:
            if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
                raise InputError(f"{path}: neither image extensions nor a table of a pixel table")
            data = hdul[1].data
            for name in COLUMNS:
                columns[name] = np.asarray(data[name])
    floats = {name: np.ascontiguousarray(columns[name], dtype=np.float32)
              for name in ("xpos", "ypos", "lambda", "data", "stat")}
    ints = {name: as_uint32(columns[name]) for name in ("dq", "origin")}
    for key in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND"):
        header.remove(key, ignore_missing=True)
    return PixTable(floats["xpos"], floats["ypos"], floats["lambda"], floats["data"],
                    floats["stat"], ints["dq"], ints["origin"], header)
