"""Disk space of a run: the sizes of its scratch files and products, estimated from the
inputs before any work, and the free-space checks and out-of-space errors.

The estimates read only headers and the small calibration tables.  The scratch files
are the IFUs' pixel tables kept on disk in low-memory mode (:mod:`musetwilight.io.spill`):
:func:`table_bytes` is the size of one, :func:`scratch_bytes` of all of a run's.
"""

from __future__ import annotations

import errno
import math
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.pixtable import LAMBDA_MAX_VALID, LAMBDA_MIN_VALID, expected_rows
from ..errors import InputError, OutputError, SpaceError
from ..params import Settings
from . import formats
from .frames import Inputs
from .preflight import cube_size_estimate
from .spill import RESAMPLING_COLUMNS

SCRATCH_ENV = "MUSETWILIGHT_SCRATCH_DIR"
COLUMN_BYTES = 4  # every spilled column is float32 or uint32
NPY_HEADER_BYTES = 128
BLOCK = 2880  # FITS block
MARGIN = 1.05  # free space asked for beyond an estimate
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_CODES = "|".join(str(code) for code in OUT_OF_SPACE)
_OUT_OF_SPACE_TEXT = re.compile(rf"requested and \d+ written|Not enough space on disk|\[Errno ({_CODES})\]")


def table_bytes(rows: int) -> int:
    """Bytes one IFU's pixel table of ``rows`` rows takes in scratch space."""
    return rows * COLUMN_BYTES * len(RESAMPLING_COLUMNS) + NPY_HEADER_BYTES * len(RESAMPLING_COLUMNS)


def ccd_shape(headers: Sequence, ifu: int) -> tuple[int, int]:
    """(rows, columns) of the trimmed CCD of ``ifu`` from a raw exposure's headers (detector keywords)."""
    index = formats.matching_hdu(headers, ifu)
    merged = formats.merge_headers(headers[0], headers[index or 0])
    binx, biny = int(merged.get("ESO DET BINX", 1) or 1), int(merged.get("ESO DET BINY", 1) or 1)
    return (2 * int(merged.get("ESO DET OUT1 NY", 0)) // biny, 2 * int(merged.get("ESO DET OUT1 NX", 0)) // binx)


def ifu_rows(inputs: Inputs, settings: Settings, ifus: Sequence[int]) -> dict[int, int]:
    """Expected rows of each IFU's wavelength-cut pixel table (0 where its tables are unusable)."""
    rows = {}
    lambda_range = (settings.lambdamin, settings.lambdamax)
    raw_headers = formats.scan_fits(inputs.skyflats[0])
    for ifu in ifus:
        try:
            trace = formats.read_ifu_table(inputs.trace, ifu, "TRACE_TABLE")
            wavecal = formats.read_ifu_table(inputs.wavecal, ifu, "WAVECAL_TABLE")
            if trace is None or wavecal is None:
                rows[ifu] = 0
                continue
            rows[ifu] = expected_rows(trace, wavecal, ifu, ccd_shape(raw_headers, ifu), lambda_range)
        except InputError:
            rows[ifu] = 0  # the IFU will fail and be skipped: it needs no scratch space
    return rows


def scratch_bytes(inputs: Inputs, settings: Settings, ifus: Sequence[int]) -> int:
    """Scratch space the low-memory path needs for these IFUs' tables (all on disk at once)."""
    return sum(table_bytes(rows) for rows in ifu_rows(inputs, settings, ifus).values() if rows)


def cube_shape(inputs: Inputs, settings: Settings, ifus: Sequence[int]) -> tuple[int, int, int]:
    """(planes, ny, nx) of the cube, an upper estimate: the field from the GEOMETRY_TABLE with
    2 spaxels of margin, the planes from the wavelength range."""
    ny, nx = cube_size_estimate(formats.read_geometry_table(inputs.geometry), list(ifus))
    low = max(settings.lambdamin, LAMBDA_MIN_VALID)
    high = min(settings.lambdamax, LAMBDA_MAX_VALID)
    return max(1, math.ceil((high - low) / settings.dlambda) + 1), ny + 2, nx + 2


def product_bytes(inputs: Inputs, settings: Settings, ifus: Sequence[int]) -> int:
    """Both products' size in bytes, an upper estimate: the cube of :func:`cube_shape`,
    headers of every IFU's QC."""
    if not ifus:
        return 0
    planes, ny, nx = cube_shape(inputs, settings, ifus)
    image = nx * ny * 4
    headers = BLOCK * (16 + 2 * len(ifus))
    datacube = (2 * planes + 1) * image  # DATA, STAT, white
    twilight = (planes + 9) * image  # DATA and up to 9 images (with their DQ)
    return datacube + twilight + 2 * headers


def format_bytes(count: float) -> str:
    """A byte count for people: "812 kB", "8.1 GB"."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit in ("bytes", "kB") else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def free_bytes(directory: str | os.PathLike) -> int:
    """Free space (for unprivileged users) of the file system holding ``directory``."""
    return shutil.disk_usage(directory).free


def check_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """Raise SpaceError when ``directory``'s file system has less than ``needed`` bytes (with a margin) free."""
    free = free_bytes(directory)
    wanted = int(needed * MARGIN)
    if wanted > free:
        raise SpaceError(f"{directory}: not enough free space for {what}: about {format_bytes(wanted)} needed, "
                         f"{format_bytes(free)} free")


def is_out_of_space(err: BaseException) -> bool:
    """Whether an error means a full file system or a file size limit, also where NumPy
    ("83721 requested and 51168 written") or astropy (which re-raises without errno) reported it."""
    if not isinstance(err, OSError):
        return False
    return err.errno in OUT_OF_SPACE or bool(_OUT_OF_SPACE_TEXT.search(str(err)))


def out_of_space_error(directory: str | os.PathLike, what: str, err: OSError) -> SpaceError:
    """The sentence for a write that ran out of space: the directory, what was written, why, the free space now."""
    try:
        free = f"{format_bytes(free_bytes(directory))} free now"
    except OSError:
        free = "free space unknown"
    return SpaceError(f"{directory}: ran out of space while writing {what} ({_why_short(err)}, {free}); "
                      "the partial files were removed")


def _why_short(err: OSError) -> str:
    """Why a write came up short: a full file system, a quota or the file size limit (``ulimit -f``)."""
    text = str(err)
    for code, reason in ((errno.EDQUOT, "disk quota exceeded"), (errno.EFBIG, "file size limit exceeded")):
        if err.errno == code or f"[Errno {code}]" in text:
            return reason
    if err.errno == errno.ENOSPC or f"[Errno {errno.ENOSPC}]" in text or "Not enough space on disk" in text:
        return "no space left"
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return "file size limit exceeded"  # a short write without errno (NumPy) under a file size limit
    return "no space left"


def scratch_root(option: str | os.PathLike | None, environ: Mapping[str, str]) -> Path:
    """The directory the scratch files go under: ``option``, else $MUSETWILIGHT_SCRATCH_DIR, else $TMPDIR."""
    chosen = Path(option or environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    if not chosen.is_dir():
        source = "" if option else f" (from ${SCRATCH_ENV})"
        raise OutputError(f"{chosen}: the scratch directory{source} does not exist or is not a directory")
    return chosen
