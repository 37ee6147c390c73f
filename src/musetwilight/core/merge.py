"""Per-IFU pixel-table post-processing and the flux-scaled merge of all IFUs.

After the pixel table of each IFU exists, muse_twilight
- multiplies each slice by the normalised inverse median of an ILLUM exposure (if given),
- cuts the table to [lambdamin, lambdamax],
- records the integrated flux of each IFU (``ESO DRS MUSE FLAT FLUX SKYn`` and
  ``ESO QC TWILIGHTn INTFLUX``) and divides each IFU by its flux relative to the
  reference IFU (IFU 1 in ESO), and
- concatenates the tables.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

ILLUM_LAMBDA_RANGE = (6500.0, 7500.0)  # Angstrom, range used for the ILLUM slice medians
NUM_IFUS = 24
FLUX_SKY = "HIERARCH ESO DRS MUSE FLAT FLUX SKY{}"
QC_INTFLUX = "HIERARCH ESO QC TWILIGHT{} INTFLUX"
ILLUM_SLICE = "HIERARCH ESO DRS MUSE PIXTABLE ILLUM{}"
ILLUM_MEAN = "HIERARCH ESO DRS MUSE PIXTABLE ILLUM MEAN"
ILLUM_STDEV = "HIERARCH ESO DRS MUSE PIXTABLE ILLUM STDEV"


class MergeError(RuntimeError):
    """The pixel tables cannot be merged into a cube."""


def cpl_median(values: np.ndarray) -> float:
    """Median as CPL computes it for a float column: mean of the middle pair as lo + (hi - lo) / 2."""
    values = np.asarray(values)
    n = values.size
    if n == 0:
        return float("nan")
    if n % 2:
        return float(np.partition(values, n // 2)[n // 2])
    part = np.partition(values, (n // 2 - 1, n // 2))
    lo, hi = part[n // 2 - 1], part[n // 2]
    return float(lo + (hi - lo) / values.dtype.type(2))


def _select(table, keep: np.ndarray):
    """A copy of a pixel table restricted to the rows where ``keep`` is true."""
    columns = {f.name: getattr(table, f.name)[keep] for f in fields(table)
               if isinstance(getattr(table, f.name), np.ndarray)}
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
    inverse = np.array([1.0 / cpl_median(group) for group in groups])
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


def integrated_flux(table) -> float:
    """Sum of the data column in double precision (ESO: column mean x number of rows)."""
    return integrated_flux_of(table.data)


def integrated_flux_of(data: np.ndarray) -> float:
    return float(np.mean(data, dtype=np.float64) * data.size) if data.size else 0.0


def external_scales(text: str | None) -> list[float] | None:
    """Parse MUSE_TWILIGHT_SCALES-style comma-separated per-IFU scales (None when unset)."""
    if text is None or not text.strip():
        return None
    try:
        return [float(word) for word in text.split(",")]
    except ValueError:
        raise MergeError(f"MUSE_TWILIGHT_SCALES: cannot parse {text!r} as comma-separated numbers") from None


def scales_from_environment() -> list[float] | None:
    return external_scales(os.environ.get("MUSE_TWILIGHT_SCALES"))


@dataclass
class MergedFlux:
    """Fluxes and scales per IFU; ``divisor`` is what each IFU's data are divided by."""

    reference_ifu: int
    flux: dict[int, float]
    scale: dict[int, float]
    divisor: dict[int, float]


def flux_scales(tables: dict[int, object], nfm: bool, scales: Sequence[float] | None = None,
                lambda_range: tuple[float, float] | None = None) -> MergedFlux:
    """Each IFU's integrated flux and the divisor that scales it relative to the reference IFU.

    ``tables`` maps IFU number to its wavelength-cut pixel table.  The reference is
    IFU 1 as in ESO; when IFU 1 is absent the lowest IFU present is used (ESO fails
    then with a misleading message).  In NFM, IFU 24 uses IFU 23's flux (0 when IFU 23
    is absent, which makes IFU 24 non-finite, as in ESO).  With external ``scales`` (24
    numbers), the reference IFU is divided by ``scales[0]`` and IFU n by ``scales[n-1]``;
    a list of another length is ignored with a warning, after the reference division,
    as ESO does.
    """
    present = sorted(n for n, t in tables.items() if t is not None and t.data.size > 0)
    if not present:
        cut = f"{lambda_range[0]:.2f}..{lambda_range[1]:.2f}" if lambda_range else "the wavelength range"
        raise MergeError(f"After cutting to {cut} Angstrom in wavelength no pixels for cube "
                         "reconstruction are left!")
    reference = present[0]
    if reference != 1:
        log.warning("IFU 1 (ESO's flux reference) is not present; using IFU %d as the flux reference", reference)
    ref_divisor = 1.0
    ref_data = tables[reference].data
    if scales is not None:
        ref_divisor = float(scales[0])
        ref_data = (ref_data / np.float64(ref_divisor)).astype(np.float32)
        if len(scales) != NUM_IFUS:
            log.warning("%d external scales found instead of %d! Not using them.", len(scales), NUM_IFUS)
            scales = None
        else:
            log.info("Using %d external scales.", len(scales))
    flux_ref = integrated_flux_of(ref_data)
    del ref_data
    fluxes, factors, divisors = {reference: flux_ref}, {reference: 1.0}, {reference: ref_divisor}
    for ifu in present[1:]:
        flux = integrated_flux(tables[ifu])
        if nfm and ifu == 24:
            flux = fluxes.get(23, 0.0)
            log.debug("NFM: using flux (%.3g) from CHAN23 for normalization", flux)
        if scales is not None:
            scale = float(scales[ifu - 1])
            flux = scale * flux_ref
        else:
            scale = flux / flux_ref
        fluxes[ifu], factors[ifu], divisors[ifu] = flux, scale, scale
    return MergedFlux(reference, fluxes, factors, divisors)


def divide(table, divisor: float):
    """A copy of ``table`` with data / divisor and stat / divisor**2 (in double, as CPL)."""
    if divisor == 1.0:
        return table
    with np.errstate(divide="ignore", invalid="ignore"):
        data = (table.data / np.float64(divisor)).astype(np.float32)
        stat = (table.stat / np.float64(divisor * divisor)).astype(np.float32)
    return replace(table, data=data, stat=stat)


def flux_scale_tables(tables: dict[int, object], nfm: bool, scales: Sequence[float] | None = None):
    """:func:`flux_scales` and the scaled copies of the tables (for inspection and tests)."""
    info = flux_scales(tables, nfm, scales)
    return {ifu: divide(tables[ifu], info.divisor[ifu]) for ifu in info.divisor}, info


def concatenate(tables: Sequence[object]):
    """One table holding all rows of ``tables`` in order; each input is released as it is copied.

    The output columns are allocated once, so the peak memory is the merged table plus
    one IFU's table, never two copies of the merged table.
    """
    tables = list(tables)
    if not tables:
        raise MergeError("no pixel tables to merge")
    first = tables[0]
    names = [f.name for f in fields(first) if isinstance(getattr(first, f.name), np.ndarray)]
    total = sum(getattr(t, names[0]).shape[0] for t in tables)
    merged = {name: np.empty(total, dtype=getattr(first, name).dtype) for name in names}
    start = 0
    for index in range(len(tables)):
        table, tables[index] = tables[index], None
        count = getattr(table, names[0]).shape[0]
        for name in names:
            merged[name][start:start + count] = getattr(table, name)
        start += count
        del table
    return replace(first, **merged)


RESAMPLING_COLUMNS = ("xpos", "ypos", "lambda_", "data", "stat", "dq")


class SpilledTable:
    """A pixel table's resampling columns kept in .npy files, read (memory-mapped) on access.

    Full-size runs keep the 24 wavelength-cut IFU tables on disk instead of in memory
    between the per-IFU stage and the resampling.
    """

    def __init__(self, table, directory: str | os.PathLike, name: str):
        from pathlib import Path

        self.paths = {}
        for column in RESAMPLING_COLUMNS:
            path = Path(directory) / f"{name}.{column}.npy"
            np.save(path, np.ascontiguousarray(getattr(table, column)))
            self.paths[column] = path
        self.header = table.header
        self.nrow = len(table.xpos)

    def __getattr__(self, column: str) -> np.ndarray:
        if column in RESAMPLING_COLUMNS:
            return np.load(self.paths[column], mmap_mode="r")
        raise AttributeError(column)
