"""Flux scaling of the IFUs relative to the reference IFU, as muse_twilight merges them.

Each IFU's integrated flux (its wavelength-cut pixel table's data summed, recorded as
``ESO DRS MUSE FLAT FLUX SKYn`` and ``ESO QC TWILIGHTn INTFLUX``) divided by the
reference IFU's is the divisor of that IFU's data in the cube, so the cube carries
the IFU-to-IFU throughput of the sky relative to the lamp flats.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MergeError, ParameterError
from ..instrument import NUM_IFUS
from .cplmath import column_mean

log = logging.getLogger(__name__)

FLUX_SKY = "HIERARCH ESO DRS MUSE FLAT FLUX SKY{}"
QC_INTFLUX = "HIERARCH ESO QC TWILIGHT{} INTFLUX"


def integrated_flux(table) -> float:
    """Sum of the data column in double precision (ESO: column mean x number of rows)."""
    return integrated_flux_of(table.data)


def integrated_flux_of(data: np.ndarray) -> float:
    """ESO's integrated flux of a data column: CPL's column mean times the number of rows."""
    return float(column_mean(data) * data.size) if data.size else 0.0


def parse_scales(text: str | None) -> list[float] | None:
    """Parse MUSE_TWILIGHT_SCALES-style comma-separated per-IFU scales (None when unset)."""
    if text is None or not text.strip():
        return None
    try:
        return [float(word) for word in text.split(",")]
    except ValueError:
        raise ParameterError(f"MUSE_TWILIGHT_SCALES: cannot parse {text!r} as comma-separated numbers") from None


@dataclass
class MergedFlux:
    """Fluxes and scales per IFU; ``divisor`` is what each IFU's data are divided by."""

    reference_ifu: int
    flux: dict[int, float]
    scale: dict[int, float]
    divisor: dict[int, float]


def flux_scales(tables: Mapping[int, Any], nfm: bool, scales: Sequence[float] | None = None,
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
