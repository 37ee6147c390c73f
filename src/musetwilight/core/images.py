"""The image containers the stages pass along (readers in :mod:`musetwilight.io` fill them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits


@dataclass
class MuseImage:
    """A trimmed or raw MUSE CCD image: data, Euro3D DQ bits, variance, merged header."""

    data: np.ndarray  # float32
    dq: np.ndarray  # uint32 Euro3D status bits, 0 = good
    stat: np.ndarray  # float32 variance
    header: fits.Header
    path: Path | None = None  # the file it was read from, for messages


@dataclass
class RawImage:
    """One IFU of a raw exposure: the untrimmed integer CCD and its merged header."""

    data: np.ndarray  # as stored (uint16 for real data), untrimmed
    header: fits.Header  # primary header updated with the CHANnn extension header
    path: Path
    ifu: int


@dataclass
class MuseMask:
    """A 2D boolean mask (True = masked) and the primary header of its file."""

    mask: np.ndarray  # bool
    header: fits.Header
    path: Path
