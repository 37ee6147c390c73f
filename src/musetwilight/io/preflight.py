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

from . import formats as io
from ..core.basicproc import layout_from_header
from .frames import InputError
from ..params import Settings
from ..core.smooth import adapt_vignetting_mask

NSLICES = 48


def preflight(inputs, settings: Settings) -> None:
    """Validate the inputs of a run before any work; raise InputError naming the file.

    ``inputs`` is the recipe's ``Inputs``; ``settings`` is accepted for checks that
    depend on parameters.
    """
    headers: dict[Path, list[fits.Header]] = {}
    for frame in inputs.frames:
        if frame.path not in headers:
            try:
                headers[frame.path] = io.scan_fits(frame.path)
            except InputError as err:
                raise InputError(f"{frame.tag} {err}") from None
    raw_ifus = _raw_ifus(inputs, headers)
    _check_setups(inputs, headers, raw_ifus)
    reduced = [ifu for ifu in raw_ifus if _matches(headers[inputs.trace], ifu)]
    geometry = _check_geometry(inputs, reduced)
    mode = str(headers[inputs.skyflats[0]][0].get("ESO INS MODE", "")).strip()
    if inputs.vignetting is not None and not mode.startswith("NFM"):
        _check_vignetting(inputs.vignetting, geometry, reduced)


def _raw_ifus(inputs, headers) -> list[int]:
    """IFUs with a CHANnn extension in every raw exposure (the others are skipped)."""
    raw = [path for path, _ in inputs.used_raw()]
    present = None
    for path in raw:
        ifus = {io.header_ifu(h) for h in headers[path]} - {None}
        present = ifus if present is None else present & ifus
    if not present:
        names = ", ".join(str(p) for p in raw)
        raise InputError(f"no IFU is present (as a CHANnn extension) in every raw exposure: {names}")
    return sorted(present)


def _matches(headers: list[fits.Header], ifu: int) -> bool:
    """Whether ESO takes this (calibration) file for ``ifu`` (see ``io.find_ifu_hdu``)."""
    if any(io.header_ifu(h) == ifu for h in headers):
        return True
    return io.header_ifu(headers[0]) is None and "PIPEFILE" not in headers[0]


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
        if io.header_ifu(header) == ifu:
            return _Layered(header, headers[0]) if index > 0 else header
    return None


def _master_header(headers: list[fits.Header], ifu: int) -> tuple[Mapping, tuple[int, int]] | None:
    """(header, DATA shape) of a master image for one IFU, as ESO would find it; None if
    the file does not match that IFU (the recipe then skips the IFU)."""
    primary = headers[0]
    names = [str(h.get("EXTNAME", "")).strip() for h in headers]
    own = io.header_ifu(primary)
    if "DATA" in names[1:] and (own == ifu or (own is None and "PIPEFILE" not in primary)):
        data = headers[names.index("DATA", 1)]
    elif f"CHAN{ifu:02d}.DATA" in names[1:]:
        data = headers[names.index(f"CHAN{ifu:02d}.DATA", 1)]
    else:
        return None
    return _Layered(primary, data), (int(data.get("NAXIS2", 0)), int(data.get("NAXIS1", 0)))


def setup_problems(raw: Mapping, raw_name: str, master: Mapping, shape: tuple[int, int],
                   master_name: str, catg: str, is_illum: bool = False) -> list[str]:
    """The mismatches between one IFU of a raw exposure and a master calibration that make
    ESO's basic processing fail that IFU (warnings are left to the basic processing)."""
    problems = []
    for key in ("ESO DET BINX", "ESO DET BINY"):
        if raw.get(key) != master.get(key):
            problems.append(f"binning does not match: {key} = {raw.get(key)} in {raw_name}, "
                            f"{master.get(key)} in {catg} {master_name}")
    if catg == "MASTER_BIAS":
        key = "ESO DET READ CURID"
        if raw.get(key) != master.get(key):
            problems.append(f"read-out mode does not match: {key} = {raw.get(key)} in {raw_name}, "
                            f"{master.get(key)} in {catg} {master_name}")
        chips = [tuple(h.get(k) for k in ("ESO DET CHIP NAME", "ESO DET CHIP ID")) for h in (raw, master)]
        if None not in chips[0] + chips[1] and chips[0] != chips[1]:
            problems.append(f"CHIP information does not match: {chips[0]} in {raw_name}, "
                            f"{chips[1]} in {catg} {master_name}")
    if catg == "MASTER_FLAT" and not is_illum:
        key = "ESO INS MODE"
        if raw.get(key) != master.get(key):
            problems.append(f"instrument modes do not match: {key} = {raw.get(key)} in {raw_name}, "
                            f"{master.get(key)} in {catg} {master_name}")
    try:
        layout = layout_from_header(raw, raw_name)
    except InputError as err:
        problems.append(str(err))
    else:
        trimmed = (2 * layout.ny, 2 * layout.nx)
        if shape != trimmed:
            problems.append(f"CCD size differs: {catg} {master_name} is {shape[1]} x {shape[0]} pixels, "
                            f"the trimmed raw data of {raw_name} {trimmed[1]} x {trimmed[0]}")
    return problems


def _check_setups(inputs, headers, raw_ifus: list[int]) -> None:
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
                if master is None:
                    continue
                problems = setup_problems(raw, name, master[0], master[1], str(master_path), catg,
                                          is_illum=tag == "ILLUM")
                if problems:
                    first_problem.setdefault(ifu, problems[0])
    if first_problem and len(first_problem) == len(raw_ifus):
        ifu = min(first_problem)
        where = "the only IFU" if len(raw_ifus) == 1 else f"all {len(raw_ifus)} IFUs"
        raise InputError(f"{first_problem[ifu]} (IFU {ifu}; no IFU can be processed, {where} fail this check)")


def _check_geometry(inputs, raw_ifus: list[int]):
    """Every IFU to be reduced (raw data and TRACE_TABLE present) needs its 48 slices,
    each once, in the GEOMETRY_TABLE."""
    table = io.read_geometry_table(inputs.geometry)
    subfield = np.asarray(table["SubField"])
    slices = np.asarray(table["SliceCCD"])
    for ifu in raw_ifus:
        found = slices[subfield == ifu]
        missing = sorted(set(range(1, NSLICES + 1)) - set(found.tolist()))
        if missing or found.size != NSLICES:
            detail = f"slice(s) {', '.join(map(str, missing))} missing" if missing else "duplicate slices"
            raise InputError(f"GEOMETRY_TABLE {inputs.geometry}: IFU {ifu} has {found.size} instead of "
                             f"{NSLICES} slices ({detail})")
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
    mask = io.read_vignetting_mask(path).mask
    if not ifus:
        return
    ny, nx = cube_size_estimate(geometry, ifus)
    try:
        adapt_vignetting_mask(mask, ny + 2, nx + 2)
    except InputError as err:
        reason = str(err).removeprefix("VIGNETTING_MASK: ")
        raise InputError(f"VIGNETTING_MASK {path}: {reason} (the cube of IFUs {', '.join(map(str, ifus))} will "
                         f"be about {nx}x{ny} spaxels; the mask must not be larger than twice that)") from None
