"""Pre-flight validation of a run's inputs: fail fast, naming the file and the problem.

Called by the recipe before any IFU is processed, so that a broken input stops the
run before any work is done (and long before any product could be written).  Only
headers are read (and the small GEOMETRY_TABLE), so the checks cost well under a
second even for full-size data.

What is checked, and why here:

* every file is a complete FITS file (readable headers, not truncated, no trailing
  garbage): a corrupt MASTER_BIAS would otherwise make every IFU fail one by one;
* at least one IFU is present in every raw exposure;
* the raw exposures agree with the master calibrations (CCD size, binning, read-out
  mode and chip vs MASTER_BIAS, instrument mode SKYFLAT vs MASTER_FLAT) -- the checks
  ESO's basic processing makes per IFU.  ESO fails the IFU on a mismatch and goes on
  with the others, and so does the recipe; but when the mismatch hits *every* IFU
  the run could only end in ESO's misleading "no pixels ... are left", so it fails
  here with the first problem;
* the GEOMETRY_TABLE has the 48 slices of every IFU to be reduced (ESO crashes
  with a segmentation fault on a missing slice);
* a VIGNETTING_MASK (WFM) is a 2D integer image (ESO's mask loader rejects others)
  whose masked quadrant fits into the cube (estimated from the geometry): otherwise
  the run would fail only at its very end.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..core.basicproc import setup_mismatches
from ..core.detector import layout_from_header, overscan_windows
from ..core.smooth import adapt_vignetting_mask
from ..errors import InputError
from ..instrument import NUM_SLICES, header_ifu, is_nfm
from ..params import Settings
from . import formats
from .frames import Inputs


def preflight(inputs: Inputs, settings: Settings) -> None:
    """Validate the inputs of a run before any work; raise InputError naming the file."""
    headers: dict[Path, list[fits.Header]] = {}
    for frame in inputs.frames:
        if frame.path not in headers:
            try:
                headers[frame.path] = formats.scan_fits(frame.path)
            except InputError as err:
                raise InputError(f"{frame.tag} {err}") from None
    raw_ifus = _raw_ifus(inputs, headers)
    _check_setups(inputs, headers, raw_ifus)
    _check_overscan_parameters(inputs, headers, raw_ifus, settings)
    reduced = [ifu for ifu in raw_ifus if formats.matching_hdu(headers[inputs.trace], ifu) is not None]
    geometry = _check_geometry(inputs, reduced)
    if inputs.vignetting is not None and not is_nfm(headers[inputs.skyflats[0]][0].get("ESO INS MODE")):
        _check_vignetting(inputs.vignetting, geometry, reduced)


def _raw_ifus(inputs: Inputs, headers: dict[Path, list[fits.Header]]) -> list[int]:
    """IFUs with a CHANnn extension in every raw exposure (the others are skipped)."""
    raw = [path for path, _ in inputs.used_raw()]
    present: set[int] | None = None
    for path in raw:
        ifus = {ifu for ifu in map(header_ifu, headers[path]) if ifu is not None}
        present = ifus if present is None else present & ifus
    if not present:
        names = ", ".join(str(p) for p in raw)
        raise InputError(f"no IFU is present (as a CHANnn extension) in every raw exposure: {names}")
    return sorted(present)


class _Layered(Mapping):
    """Keyword lookups in several headers, the first that has the keyword winning: a merged
    header without copying (raw: extension over primary; master: primary over DATA)."""

    def __init__(self, *headers: fits.Header):
        self.headers = headers

    def __getitem__(self, key: str):
        for header in self.headers:
            if key in header:
                return header[key]
        raise KeyError(key)

    def __iter__(self):
        return iter(dict.fromkeys(k for header in self.headers for k in header.keys()))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _raw_header(headers: list[fits.Header], ifu: int) -> Mapping | None:
    for index, header in enumerate(headers):
        if header_ifu(header) == ifu:
            return _Layered(header, headers[0]) if index > 0 else header
    return None


def _master_header(headers: list[fits.Header], ifu: int) -> tuple[Mapping, tuple[int, int]] | None:
    """(header, DATA shape) of a master image for one IFU, as the reader finds it; None if
    the file holds no image for that IFU (the recipe then skips the IFU)."""
    found = formats.muse_image_layout(headers, ifu)
    if found is None:
        return None
    data = headers[found[1]]
    return _Layered(headers[0], data), (int(data.get("NAXIS2", 0)), int(data.get("NAXIS1", 0)))


def _check_setups(inputs: Inputs, headers: dict[Path, list[fits.Header]], raw_ifus: list[int]) -> None:
    """Raw-vs-calibration checks per IFU; fail only when no IFU would survive them."""
    masters = [(tag, path) for tag, path in (("MASTER_BIAS", inputs.bias), ("MASTER_DARK", inputs.dark),
                                             ("MASTER_FLAT", inputs.flat)) if path is not None]
    first_problem: dict[int, str] = {}
    for ifu in raw_ifus:
        found = [(catg, path, _master_header(headers[path], ifu)) for catg, path in masters]
        for raw_path, tag in inputs.used_raw():
            raw = _raw_header(headers[raw_path], ifu)
            name = f"{raw_path}[CHAN{ifu:02d}]"
            for catg, master_path, master in found:
                if master is None or raw is None:
                    continue
                fatal = [m for m in setup_mismatches(raw, name, master[0], str(master_path), master[1], catg,
                                                     is_illum=tag == "ILLUM") if m.fatal]
                if fatal:
                    first_problem.setdefault(ifu, fatal[0].text)
    if first_problem and len(first_problem) == len(raw_ifus):
        ifu = min(first_problem)
        where = "the only IFU" if len(raw_ifus) == 1 else f"all {len(raw_ifus)} IFUs"
        raise InputError(f"{first_problem[ifu]} (IFU {ifu}; no IFU can be processed, {where} fail this check)")


def _check_overscan_parameters(inputs: Inputs, headers: dict[Path, list[fits.Header]], raw_ifus: list[int],
                               settings: Settings) -> None:
    """``ovscignore`` must leave overscan columns to use (ESO fails every IFU otherwise)."""
    path = inputs.skyflats[0]
    raw = _raw_header(headers[path], raw_ifus[0])
    if raw is None:
        return  # no such extension: reported per IFU by the basic processing
    try:
        layout = layout_from_header(raw, f"{path}[CHAN{raw_ifus[0]:02d}]")
    except InputError:
        return  # reported per IFU by the basic processing
    try:
        overscan_windows(layout, 1, settings.ovscignore)
    except InputError as err:
        raise InputError(f"{path}[CHAN{raw_ifus[0]:02d}]: parameter {err}") from None


def _check_geometry(inputs: Inputs, raw_ifus: list[int]):
    """Every IFU to be reduced (raw data and TRACE_TABLE present) needs its 48 slices,
    each once, in the GEOMETRY_TABLE."""
    table = formats.read_geometry_table(inputs.geometry)
    subfield = np.asarray(table["SubField"])
    slices = np.asarray(table["SliceCCD"])
    for ifu in raw_ifus:
        found = slices[subfield == ifu]
        missing = sorted(set(range(1, NUM_SLICES + 1)) - set(found.tolist()))
        if missing or found.size != NUM_SLICES:
            detail = f"slice(s) {', '.join(map(str, missing))} missing" if missing else "duplicate slices"
            raise InputError(f"GEOMETRY_TABLE {inputs.geometry}: IFU {ifu} has {found.size} instead of "
                             f"{NUM_SLICES} slices ({detail})")
    return table


def cube_size_estimate(geometry, ifus: list[int]) -> tuple[int, int]:
    """(ny, nx) of the cube the recipe will build from these IFUs, from the slice positions
    and widths of the GEOMETRY_TABLE (exact up to a pixel: the cube spans the pixel table)."""
    rows = np.isin(np.asarray(geometry["SubField"]), ifus)
    x, y, width, angle = (np.asarray(geometry[name], dtype=np.float64)[rows] for name in ("x", "y", "width", "angle"))
    half_x = width / 2 * np.abs(np.cos(np.radians(angle)))
    half_y = width / 2 * np.abs(np.sin(np.radians(angle)))
    nx = int(round((x + half_x).max() - (x - half_x).min())) + 1
    ny = int(round((y + half_y).max() - (y - half_y).min())) + 1
    return ny, nx


def _check_vignetting(path: Path, geometry, ifus: list[int]) -> None:
    """The VIGNETTING_MASK must be an integer image with a masked corner that fits into the
    cube (ESO pastes its most-masked quadrant into the cube's corner: a mask more than twice
    the cube size cannot be used).  Checked against the cube size estimated from the
    geometry with a margin of 2 spaxels, so only certain failures stop the run here."""
    mask = formats.read_vignetting_mask(path).mask
    if not ifus:
        return
    ny, nx = cube_size_estimate(geometry, ifus)
    try:
        adapt_vignetting_mask(mask, ny + 2, nx + 2)
    except InputError as err:
        reason = str(err).removeprefix("VIGNETTING_MASK: ")
        raise InputError(f"VIGNETTING_MASK {path}: {reason} (the cube of IFUs {', '.join(map(str, ifus))} will "
                         f"be about {nx}x{ny} spaxels; the mask must not be larger than twice that)") from None
