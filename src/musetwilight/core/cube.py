"""The output cube grid of muse_twilight and the white-light image.

The merged twilight pixel table is in "pixel" units of the geometry table
(not positioned on the sky), so ESO builds a linear cube WCS of one geometry
pixel per spaxel: CTYPE1/2 = PIXEL, CRPIX = 1, CRVAL1/2 = the lowest xpos/ypos
of the table, and wavelength planes of ``dlambda`` starting at the lowest
lambda of the (wavelength-restricted) table.  Sizes follow ESO:
``round(xmax - xmin) + 1`` spaxels (round half away from zero) and
``ceil((lmax - lmin) / dlambda) + 1`` planes, with the limits taken as float32
as in the pixel-table header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from astropy.io import fits

from ..errors import MergeError, ParameterError
from ..instrument import SPECTRAL_SAMPLING  # ESO's sampling when dlambda is 0


def lround(value: float) -> int:
    """C ``lround``: round half away from zero."""
    truncated = math.trunc(value)
    if abs(value - truncated) >= 0.5:
        truncated += 1 if value > 0 else -1
    return int(truncated)


def _cpl_double(value: float) -> float:
    """A double as CPL writes it into a FITS card (15 significant digits)."""
    return float(f"{value:.15g}")


@dataclass(frozen=True)
class CubeGrid:
    """Linear output grid: spaxel (i, j, l) has its centre at
    ``(crval1 + cd1 * i, crval2 + cd2 * j, crval3 + cd3 * l)`` (0-based)."""

    nx: int
    ny: int
    nz: int
    crval1: float
    crval2: float
    crval3: float
    cd3: float
    cd1: float = 1.0
    cd2: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """NumPy shape of the cube, ``(nz, ny, nx)``."""
        return (self.nz, self.ny, self.nx)

    def rows(self, first: int, last: int) -> CubeGrid:
        """The grid of the cube rows first..last (its CRVAL2 at row ``first``)."""
        return replace(self, ny=last - first + 1, crval2=self.crval2 + first)

    def wavelengths(self) -> np.ndarray:
        """Centre wavelength of each plane (Angstrom)."""
        return np.arange(self.nz) * self.cd3 + self.crval3

    def header_wcs(self) -> fits.Header:
        """The WCS cards ESO writes into the DATA/STAT extensions, in ESO's order.

        Real values are rounded to the 15 significant digits CPL writes, so that
        the cards read back equal to ESO's (CRVAL1/2/3 are float32 limits)."""
        header = fits.Header()
        header["CRPIX1"] = 1.0
        header["CRVAL1"] = _cpl_double(self.crval1)
        header["CTYPE1"] = "PIXEL"
        header["CUNIT1"] = "pixel"
        header["CD1_1"] = self.cd1
        header["CRPIX2"] = 1.0
        header["CRVAL2"] = _cpl_double(self.crval2)
        header["CTYPE2"] = "PIXEL"
        header["CUNIT2"] = "pixel"
        header["CD2_2"] = self.cd2
        header["CD1_2"] = 0.0
        header["CD2_1"] = 0.0
        header["CTYPE3"] = "AWAV"
        header["CUNIT3"] = "Angstrom"
        header["CD3_3"] = _cpl_double(self.cd3)
        header["CRPIX3"] = 1.0
        header["CRVAL3"] = _cpl_double(self.crval3)
        header["CD1_3"] = 0.0
        header["CD2_3"] = 0.0
        header["CD3_1"] = 0.0
        header["CD3_2"] = 0.0
        return header


def make_grid(xpos: np.ndarray, ypos: np.ndarray, lambda_: np.ndarray,
              dlambda: float) -> CubeGrid:
    """The cube grid ESO derives from a merged pixel table in pixel units.

    ``xpos``, ``ypos``, ``lambda_`` are the table columns after the wavelength
    restriction to lambdamin..lambdamax; the spatial step is one geometry pixel
    in WFM and NFM alike, the spectral step ``dlambda`` (0 means 1.25 A).
    """
    if len(xpos) == 0:
        raise MergeError("the pixel table is empty: no pixels for cube reconstruction")
    return grid_from_limits(np.min(xpos), np.max(xpos), np.min(ypos), np.max(ypos),
                            np.min(lambda_), np.max(lambda_), dlambda)


def grid_from_limits(xmin, xmax, ymin, ymax, lmin, lmax, dlambda: float) -> CubeGrid:
    """:func:`make_grid` from the table's column limits (e.g. combined over several IFU tables)."""
    if dlambda < 0 or not math.isfinite(dlambda):
        raise ParameterError(f"dlambda must be positive, got {dlambda}")
    if dlambda == 0:
        dlambda = SPECTRAL_SAMPLING
    # the limits live in the pixel-table header as float32
    xlo, xhi = np.float32(xmin), np.float32(xmax)
    ylo, yhi = np.float32(ymin), np.float32(ymax)
    llo, lhi = np.float32(lmin), np.float32(lmax)
    nx = lround(abs(float(xhi) - float(xlo)) / 1.0) + 1
    ny = lround(abs(float(yhi) - float(ylo)) / 1.0) + 1
    # ESO subtracts the float limits in single precision
    nz = int(math.ceil(float(np.float32(lhi - llo)) / dlambda)) + 1
    return CubeGrid(nx=nx, ny=ny, nz=nz, crval1=float(xlo), crval2=float(ylo),
                    crval3=float(llo), cd3=float(dlambda))


def white_light(cube_data: np.ndarray) -> np.ndarray:
    """White-light image as ESO's unfiltered collapse: per spaxel the mean over
    all planes of the finite (good) voxels, NaN where there is none."""
    good = np.isfinite(cube_data)
    total = np.where(good, cube_data, 0).sum(axis=0, dtype=np.float64)
    count = good.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        image = total / count
    image[count == 0] = np.nan
    return image.astype(np.float32)
