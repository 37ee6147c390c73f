"""MUSE instrument constants and instrument-mode rules, each in one place.

Facts of the instrument and of ESO's pipeline 2.8.7 that several stages need: the
number of IFUs and slices, the instrument modes and their NaD notch ranges, the
read-out port positions ESO hard-codes, the spectral sampling, and the Euro3D
data-quality bits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

NUM_IFUS = 24
NUM_SLICES = 48  # slices per IFU (CCD slices 1..48 from left to right)
SLICES_PER_STACK = 12  # sky slices 12k+1..12k+12 form slice stack k (0..3) of an IFU
IFU_HALF_HEIGHT = 6.0  # half the 12 slice rows of an IFU in the field (GEOMETRY_TABLE y units)

MODES = ("WFM-NOAO-N", "WFM-NOAO-E", "WFM-AO-N", "WFM-AO-E", "NFM-AO-N")

#: Wavelength ranges (Angstrom) that the AO laser notch filter blocks, by mode (ESO's kMuseNa*).
NOTCH_RANGES = {"WFM-AO-N": (5805.0, 5966.0), "WFM-AO-E": (5755.0, 6008.0), "NFM-AO-N": (5780.0, 6050.0)}

#: ESO DET OUTi X/Y of the right/top read-out ports: constants in ESO, whatever the CCD size.
PORT_X_RIGHT = 4096
PORT_Y_TOP = 4112

#: Nominal spectral sampling of MUSE (Angstrom per CCD pixel).
SPECTRAL_SAMPLING = 1.25

#: Raw pixels above this (adu) are flagged saturated.
SATURATION_LIMIT = 65500.0


def ifu_ranges(ifus: Iterable[int]) -> str:
    """IFU numbers as ranges: [1, 2, 3, 5, 7, 8] -> "1-3, 5, 7-8"."""
    parts: list[str] = []
    for ifu in sorted(ifus):
        if parts and int(parts[-1].split("-")[-1]) == ifu - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{ifu}"
        else:
            parts.append(str(ifu))
    return ", ".join(parts)


class Euro3D:
    """Euro3D data-quality bits (status 0 = good)."""

    COSMIC_RAY = np.uint32(1 << 5)
    LOW_QE = np.uint32(1 << 6)
    HOT_PIXEL = np.uint32(1 << 8)
    DARK_PIXEL = np.uint32(1 << 9)
    SATURATED = np.uint32(1 << 12)
    DEAD_PIXEL = np.uint32(1 << 13)
    BAD_OTHER = np.uint32(1 << 14)
    OUTLIER = np.uint32(1 << 26)
    NAD_NOTCH = np.uint32(1 << 27)
    MUSE_TRAP = np.uint32(1 << 29)
    MISSING_DATA = np.uint32(1 << 30)
    OUTSIDE_RANGE = np.uint32(1 << 31)


def normalised_mode(mode: str | None) -> str:
    """ESO INS MODE without surrounding blanks ('' when unknown)."""
    return mode.strip() if isinstance(mode, str) else ""


def is_nfm(mode: str | None) -> bool:
    """Narrow-field mode, as ESO decides it: ESO INS MODE starts with ``NFM``."""
    return normalised_mode(mode).startswith("NFM")


def is_ao(mode: str | None) -> bool:
    """A mode with adaptive optics (and so the NaD notch): NFM, WFM-AO-N, WFM-AO-E."""
    m = normalised_mode(mode)
    return m.startswith(("NFM", "WFM-AO-N", "WFM-AO-E"))


def notch_range(mode: str | None) -> tuple[float, float] | None:
    """The NaD notch range (Angstrom) of an AO mode, None without AO."""
    m = normalised_mode(mode)
    if m.startswith("NFM"):
        return NOTCH_RANGES["NFM-AO-N"]
    for name in ("WFM-AO-N", "WFM-AO-E"):
        if m.startswith(name):
            return NOTCH_RANGES[name]
    return None


_ATOI = re.compile(r"^[ \t\n\v\f\r]*([+-]?\d+)")


def ifu_of_extname(name: object) -> int | None:
    """The IFU number an EXTNAME stands for, as ESO parses it; None if it names no IFU.

    ``CHAN05`` and ``CHAN05.DATA`` give 5.  Like ``muse_pfits_has_ifu`` the name must
    start with ``CHAN`` and be at least 6 characters long; the number is C ``atoi``
    of the rest (0 when it does not start with digits), truncated to an unsigned char.
    """
    if not isinstance(name, str) or not name.startswith("CHAN") or len(name) < 6:
        return None
    match = _ATOI.match(name[4:])
    return int(match.group(1)) % 256 if match else 0


def header_ifu(header: Mapping[str, Any]) -> int | None:
    """The IFU (1..24) named by a header's EXTNAME, else None (``muse_utils_get_ifu``)."""
    ifu = ifu_of_extname(header.get("EXTNAME"))
    return ifu if ifu is not None and 1 <= ifu <= NUM_IFUS else None
