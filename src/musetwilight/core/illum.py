"""Per-IFU pixel-table steps after the table is built: ILLUM slice correction and wavelength cut.

With an ILLUM exposure (a lamp flat taken close in time to the sky flats), each slice
of the sky-flat table is multiplied by the normalised inverse median of that slice in
the ILLUM table (6500..7500 Angstrom), which corrects the lamp flat's slice-to-slice
level for the temperature drift between the two; then the table is cut to
[lambdamin, lambdamax].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import numpy as np

from .cplmath import median_of

log = logging.getLogger(__name__)

ILLUM_LAMBDA_RANGE = (6500.0, 7500.0)  # Angstrom, range used for the ILLUM slice medians
ILLUM_SLICE = "HIERARCH ESO DRS MUSE PIXTABLE ILLUM{}"
ILLUM_MEAN = "HIERARCH ESO DRS MUSE PIXTABLE ILLUM MEAN"
ILLUM_STDEV = "HIERARCH ESO DRS MUSE PIXTABLE ILLUM STDEV"


def _select(table, keep: np.ndarray):
    """A copy of a pixel table restricted to the rows where ``keep`` is true."""
    columns = {f.name: getattr(table, f.name)[keep] for f in fields(table)
               if isinstance(getattr(table, f.name), np.ndarray)}
    if any(f.name == "limits" for f in fields(table)):
        columns["limits"] = None
    return replace(table, **columns)


def slice_numbers(table) -> np.ndarray:
    """The CCD slice number (1..48) of every row, from the origin bit field."""
    return (np.asarray(table.origin) & 0x3F).astype(np.int32)


def restrict_wavelength(table, lambda_min: float, lambda_max: float):
    """Keep rows with lambda_min <= lambda <= lambda_max (limits compared in float32, as ESO)."""
    lam = table.lambda_
    keep = (lam >= np.float32(lambda_min)) & (lam <= np.float32(lambda_max))
    return table if keep.all() else _select(table, keep)


@dataclass(frozen=True)
class IllumCorrection:
    """Per-slice multiplicative factors derived from an ILLUM exposure."""

    slices: np.ndarray  # int, CCD slice numbers in table order
    factors: np.ndarray  # float64, normalised to mean 1


def illum_correction(illum_table) -> IllumCorrection:
    """Slice factors 1/median(data in 6500..7500 A), normalised to a mean of 1 over the slices."""
    table = restrict_wavelength(illum_table, *ILLUM_LAMBDA_RANGE)
    slices = slice_numbers(table)
    present = np.unique(slices)
    order = np.argsort(slices, kind="stable")
    bounds = np.searchsorted(slices[order], present)
    groups = np.split(table.data[order], bounds[1:])
    inverse = np.array([1.0 / median_of(group) for group in groups])
    return IllumCorrection(present, inverse / inverse.mean())


def apply_illum(table, correction: IllumCorrection, ifu: int):
    """Multiply each slice's data by its factor (stat by the square); record the factors."""
    slices = slice_numbers(table)
    factor_of_slice = np.full(64, np.nan)
    factor_of_slice[correction.slices] = correction.factors
    row_factor = factor_of_slice[slices]
    missing = np.unique(slices[np.isnan(row_factor)])
    if missing.size:
        log.warning("ILLUM correction: no ILLUM factor for slice(s) %s of IFU %d; left uncorrected",
                    ", ".join(map(str, missing)), ifu)
        row_factor = np.where(np.isnan(row_factor), 1.0, row_factor)
    data = (table.data * row_factor).astype(np.float32)
    stat = (table.stat * row_factor**2).astype(np.float32)
    header = table.header.copy()
    used = [s for s in correction.slices if s in set(np.unique(slices))]
    for slice_number, factor in zip(correction.slices, correction.factors):
        if slice_number in used:
            header[ILLUM_SLICE.format(int(slice_number))] = float(factor)
    applied = np.array([f for s, f in zip(correction.slices, correction.factors) if s in used])
    header[ILLUM_MEAN] = float(applied.mean())
    header[ILLUM_STDEV] = float(applied.std(ddof=1)) if applied.size > 1 else 0.0
    log.info("Applying ILLUM flat-field in IFU %d (%d slices)", ifu, applied.size)
    return replace(table, data=data, stat=stat, header=header)
